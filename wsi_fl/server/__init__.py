"""What the coordinator runs: the Flower ServerApp, the round loop (screening, checkpoints, resume), the
strategies and the SecAgg+ driver.

Never imports :mod:`wsi_fl.site` (a test checks the import graph); what it sends the sites is defined in
:mod:`wsi_fl.federation`.
"""

from wsi_fl._lazy import lazy_exports

_EXPORTS = {
    "make_server_app": "app",
    "run_server": "loop",
    "FedResult": "loop",
    "FederationError": "loop",
    "create_strategy": "strategies",
    "list_strategies": "strategies",
    "register_strategy": "strategies",
    "run_secagg_server": "secagg",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
