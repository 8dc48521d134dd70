"""What both sides of a federation share: the run config and the keys sent to sites, the wire format
and update screening, pooled metrics from histograms.

The one place where the site (:mod:`wsi_fl.site`) and the server (:mod:`wsi_fl.server`) meet: neither imports the
other, so a hospital can audit the site's code without reading the coordinator's.
"""

from wsi_fl._lazy import lazy_exports

_EXPORTS = {
    "FedConfig": "config",
    "CLIENT_KEYS": "config",
    "MODEL_KEYS": "config",
    "to_record": "arrays",
    "to_state_dict": "arrays",
    "check_update": "arrays",
    "score_histograms": "histograms",
    "histogram_auc": "histograms",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
