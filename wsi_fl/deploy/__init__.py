"""Certificates and containers: TLS files and SuperNode keys (:mod:`.certs`), the podman/docker command
lines (:mod:`.containers`), the images' pinned requirements (:mod:`.image_lock`).
"""

from wsi_fl._lazy import lazy_exports

_EXPORTS = {
    "write_tls_certificates": "certs",
    "write_supernode_keys": "certs",
    "container_engine": "containers",
    "disagreements": "image_lock",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
