"""What a hospital runs: the Flower ClientApp, where its data is, its policy, the guard that enforces it, the
audit log, and its mods (SecAgg+, clipping).

Never imports :mod:`wsi_fl.server` (a test checks the import graph): what a site executes must be readable without
the coordinator's code.
"""

from wsi_fl._lazy import lazy_exports

_EXPORTS = {
    "make_client_app": "app",
    "SiteData": "data",
    "load_site": "data",
    "SiteConfigError": "data",
    "SitePolicy": "policy",
    "load_policy": "policy",
    "PolicyError": "policy",
    "PolicyViolation": "policy",
    "SiteGuard": "guard",
    "AuditLog": "audit",
    "secagg_mod": "secagg",
    "clipping_mod": "clipping",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
