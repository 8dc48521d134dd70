"""Differential privacy, used by both sides: :mod:`.central` (a site is the unit; the server adds noise to
the mean of clipped updates) and :mod:`.dpsgd` (a slide is the unit; DP-SGD at each site).

The two modules are named for the guarantee they give, and their functions are reached through the module
(``central.make_plan``, ``dpsgd.make_plan``) so the two accountings are never confused.
"""

from wsi_fl._lazy import lazy_exports

_EXPORTS = {
    "central": "central",
    "dpsgd": "dpsgd",
    "PrivacyPlan": "central",
    "PrivacyLedger": "central",
    "DpSgdPlan": "dpsgd",
    "PrivacyBudgetError": "dpsgd",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
