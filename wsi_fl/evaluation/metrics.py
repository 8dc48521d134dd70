"""Slide-level evaluation metrics, with a bootstrap confidence interval for the AUC.

Test sets in pathology are small (tens to a few hundred slides per site), so an
AUC without an interval invites over-reading; the percentile bootstrap over
slides gives one without distributional assumptions. Every number comes from
scikit-learn so that results match what reviewers recompute themselves; this
module only decides *which* numbers, handles the degenerate cases (a test split
with a single class, a bootstrap resample lacking a class) without crashing,
and returns a plain JSON-serialisable dict that goes straight into a report.

Conventions:

* ``probs`` are per-class probabilities (softmax output), shape ``(n, C)``; rows
  must sum to 1 (within 1e-3), because logits passed by mistake would otherwise
  give silently wrong Brier scores and calibration.
* Binary (``C == 2``): the positive class is index 1; a slide is called positive
  when ``P(class 1) >= threshold``.
* Multi-class: predictions are the argmax; the AUC is the macro average of the
  one-vs-rest AUCs; the Brier score is scikit-learn's multi-class one (squared
  error to the one-hot label summed over classes, averaged over slides, range
  [0, 2]); calibration is of the top-class confidence against being correct.
* Undefined values (an AUC with one class present, the sensitivity of an absent
  class) are ``None``, with a ``"note"`` saying why.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import sklearn
from sklearn.calibration import calibration_curve
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    brier_score_loss,
    confusion_matrix,
    roc_auc_score,
)

__all__ = ["bootstrap_ci", "calibration_bins", "check_inputs", "classification_metrics"]

StatFn = Callable[[np.ndarray, np.ndarray], float]

_ROW_SUM_TOL = 1e-3


def check_inputs(y_true: Any, probs: Any, n_classes: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Validate and normalise ``(y_true, probs)``: int labels ``(n,)`` and float64 probabilities ``(n, C)``.

    A 1-D ``probs`` is taken as ``P(class 1)`` of a binary problem. Rows are
    renormalised to sum to exactly 1 (float32 softmax output is off by ~1e-7,
    which scikit-learn's multi-class AUC rejects).
    """
    y = np.asarray(y_true)
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim == 1:
        p = np.stack([1.0 - p, p], axis=1)
    if p.ndim != 2 or p.shape[1] < 2:
        raise ValueError(f"probs must have shape (n, C) with C >= 2, got {p.shape}")
    if y.ndim != 1 or len(y) != len(p):
        raise ValueError(f"y_true must have shape ({len(p)},), got {y.shape}")
    if len(y) == 0:
        raise ValueError("no samples to evaluate")
    if n_classes is not None and p.shape[1] != n_classes:
        raise ValueError(f"probs has {p.shape[1]} columns but there are {n_classes} classes")
    if not np.all(np.isfinite(p)) or p.min() < 0.0 or p.max() > 1.0:
        raise ValueError("probs must be finite probabilities in [0, 1]")
    row_sums = p.sum(axis=1)
    if np.abs(row_sums - 1.0).max() > _ROW_SUM_TOL:
        raise ValueError(f"probs rows must sum to 1 (max deviation {np.abs(row_sums - 1.0).max():.3g}); pass softmax")
    if not np.all(np.equal(np.mod(y, 1), 0)):
        raise ValueError("y_true must hold integer class indices")
    y = y.astype(np.int64)
    if y.min() < 0 or y.max() >= p.shape[1]:
        raise ValueError(f"y_true values must lie in [0, {p.shape[1] - 1}], got [{y.min()}, {y.max()}]")
    return y, p / row_sums[:, None]


def bootstrap_ci(
    stat_fn: StatFn,
    y_true: np.ndarray,
    probs: np.ndarray,
    n_bootstrap: int,
    seed: int,
    alpha: float = 0.05,
) -> tuple[float, float, int]:
    """Percentile bootstrap ``(lo, hi, n_used)`` of ``stat_fn(y, probs)``, resampling slides with replacement.

    Resamples that lack a class present in ``y_true`` are skipped (an AUC is
    undefined there) and so are non-finite statistics; ``n_used`` says how many
    counted. With none usable, ``lo`` and ``hi`` are NaN. The same ``seed``
    always gives the same interval.
    """
    y = np.asarray(y_true)
    p = np.asarray(probs)
    n = len(y)
    n_present = np.unique(y).size
    rng = np.random.default_rng(seed)
    stats: list[float] = []
    for _ in range(int(n_bootstrap)):
        idx = rng.integers(0, n, size=n)
        yb = y[idx]
        if np.unique(yb).size < n_present:
            continue
        value = stat_fn(yb, p[idx])
        if value is not None and math.isfinite(value):
            stats.append(float(value))
    if not stats:
        return math.nan, math.nan, 0
    lo, hi = np.percentile(stats, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return float(lo), float(hi), len(stats)


def calibration_bins(y_binary: np.ndarray, prob: np.ndarray, n_bins: int = 10) -> dict[str, list[float] | list[int]]:
    """Reliability-diagram data over ``n_bins`` uniform bins of [0, 1], non-empty bins only.

    ``prob_true``/``prob_pred`` come from :func:`sklearn.calibration.calibration_curve`;
    ``count`` (slides per bin) uses the same bin assignment so the three lists align.
    """
    y = np.asarray(y_binary).astype(np.int64)
    prob = np.asarray(prob, dtype=np.float64)
    prob_true, prob_pred = calibration_curve(y, prob, n_bins=n_bins, strategy="uniform", pos_label=1)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    counts = np.bincount(np.searchsorted(edges[1:-1], prob), minlength=n_bins)
    return {
        "prob_pred": [float(v) for v in prob_pred],
        "prob_true": [float(v) for v in prob_true],
        "count": [int(c) for c in counts[counts > 0]],
    }


def _binary_auc(y: np.ndarray, p: np.ndarray) -> float:
    return float(roc_auc_score(y, p[:, 1]))


def _macro_ovr_auc(y: np.ndarray, p: np.ndarray) -> float:
    return float(roc_auc_score(y, p, multi_class="ovr", average="macro", labels=np.arange(p.shape[1])))


def _ratio(num: float, den: float) -> float | None:
    return float(num / den) if den > 0 else None


def _ci(lo: float, hi: float) -> list[float] | None:
    return None if math.isnan(lo) else [lo, hi]


def _balanced_accuracy(y: np.ndarray, pred: np.ndarray) -> float:
    # With a class absent from y_true, scikit-learn averages recall over the present classes and warns; that is the
    # value we want, and the "note" already explains the degenerate split.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return float(balanced_accuracy_score(y, pred))


def classification_metrics(
    y_true: np.ndarray,
    probs: np.ndarray,
    *,
    classes: Sequence[str],
    threshold: float = 0.5,
    n_bootstrap: int = 1000,
    seed: int = 0,
    n_bins: int = 10,
) -> dict:
    """All slide-level metrics of one evaluation as a JSON-serialisable dict (see the module docstring)."""
    classes = [str(c) for c in classes]
    y, p = check_inputs(y_true, probs, len(classes))
    n_classes = len(classes)
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must lie in [0, 1], got {threshold}")
    counts = np.bincount(y, minlength=n_classes)
    present = int((counts > 0).sum())
    notes: list[str] = []
    out: dict[str, Any] = {
        "task": "binary" if n_classes == 2 else "multiclass",
        "classes": classes,
        "n": len(y),
        "n_per_class": {c: int(k) for c, k in zip(classes, counts, strict=True)},
    }

    binary = n_classes == 2
    stat_fn = _binary_auc if binary else _macro_ovr_auc
    if present == n_classes:
        auc: float | None = stat_fn(y, p)
        # Inputs are validated above; skipping scikit-learn's per-call validation makes the 1000 resamples ~15% faster.
        with sklearn.config_context(assume_finite=True, skip_parameter_validation=True):
            lo, hi, used = bootstrap_ci(stat_fn, y, p, n_bootstrap, seed)
        if used == 0 and n_bootstrap > 0:
            notes.append("no bootstrap resample contained every class; no AUC interval")
    else:
        absent = [c for c, k in zip(classes, counts, strict=True) if k == 0]
        auc, lo, hi, used = None, math.nan, math.nan, 0
        notes.append(f"AUC undefined: class(es) {', '.join(absent)} absent from y_true")

    if binary:
        pred = (p[:, 1] >= threshold).astype(np.int64)
        cm = confusion_matrix(y, pred, labels=[0, 1])
        (tn, fp), (fn, tp) = cm
        out.update(
            n_positive=int(counts[1]),
            auc=auc,
            auc_ci95=_ci(lo, hi),
            n_bootstrap=int(n_bootstrap),
            n_bootstrap_used=used,
            threshold=float(threshold),
            accuracy=float(accuracy_score(y, pred)),
            balanced_accuracy=_balanced_accuracy(y, pred),
            sensitivity=_ratio(tp, tp + fn),
            specificity=_ratio(tn, tn + fp),
            confusion_matrix=cm.tolist(),
            brier=float(brier_score_loss(y, p[:, 1], labels=[0, 1])),
            calibration={"target": f"P({classes[1]})", **calibration_bins(y, p[:, 1], n_bins)},
        )
    else:
        pred = p.argmax(axis=1)
        cm = confusion_matrix(y, pred, labels=np.arange(n_classes))
        total = cm.sum()
        sens, spec, auc_per_class = {}, {}, {}
        for k, name in enumerate(classes):
            tp = cm[k, k]
            fn = cm[k].sum() - tp
            fp = cm[:, k].sum() - tp
            sens[name] = _ratio(tp, tp + fn)
            spec[name] = _ratio(total - tp - fn - fp, total - tp - fn)
            yk = (y == k).astype(np.int64)
            auc_per_class[name] = float(roc_auc_score(yk, p[:, k])) if 0 < yk.sum() < len(yk) else None
        correct = (pred == y).astype(np.int64)
        out.update(
            auc=auc,
            auc_ci95=_ci(lo, hi),
            auc_per_class=auc_per_class,
            n_bootstrap=int(n_bootstrap),
            n_bootstrap_used=used,
            accuracy=float(accuracy_score(y, pred)),
            balanced_accuracy=_balanced_accuracy(y, pred),
            sensitivity=sens,
            specificity=spec,
            confusion_matrix=cm.tolist(),
            brier=float(brier_score_loss(y, p, labels=np.arange(n_classes))),
            calibration={"target": "top-class confidence", **calibration_bins(correct, p.max(axis=1), n_bins)},
        )
    if notes:
        out["note"] = "; ".join(notes)
    return out
