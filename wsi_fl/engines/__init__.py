"""The ways to run a federation: Flower's simulation engine (:mod:`.simulation`), the in-process grid used by
tests (:mod:`.inline`), and the deployment engine on loopback with TLS (:mod:`.deployment`, ``wsi-fl rehearse``).

Engines wire a site and a server together, so they are the one room allowed to import both.
"""

from wsi_fl._lazy import lazy_exports

_EXPORTS = {
    "simulate": "simulation",
    "InlineGrid": "inline",
    "rehearse": "deployment",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
