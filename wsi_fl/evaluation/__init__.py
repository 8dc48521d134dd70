"""Predictions -> reports: metrics with confidence intervals, ROC/calibration plots, attention heatmaps,
model comparison.

Read-only with respect to training: nothing here changes a model, so a report can be redrawn from a checkpoint and a
feature directory at any time.
"""

from wsi_fl._lazy import lazy_exports

_EXPORTS = {
    "EvalOptions": "options",
    "evaluate_checkpoint": "evaluate",
    "classification_metrics": "metrics",
    "bootstrap_ci": "metrics",
    "attention_heatmap": "heatmap",
    "score_models": "compare",
    "format_table": "compare",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
