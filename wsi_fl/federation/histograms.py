"""Federated AUC and confusion counts from per-site aggregates: no per-slide score leaves a site.

A site bins its predicted probabilities into ``bins`` equal-width bins, one
histogram for the slides of the class and one for the others, and sends the
counts. Summed over sites, these give the pooled ROC curve: the AUC below is
the Mann-Whitney statistic with scores in the same bin counted as ties, so it
equals scikit-learn's AUC on the pooled scores up to that binning (exactly,
when no positive and negative share a bin). Binary outcomes use class 1's
probability; multi-class outcomes one-vs-rest per class, macro-averaged, as
:func:`wsi_fl.mil.training.auc_score` does.

The confusion matrix (argmax predictions) gives accuracy and balanced
accuracy the same way.
"""

from __future__ import annotations

import math

import numpy as np


def score_histograms(targets: np.ndarray, probs: np.ndarray, bins: int) -> np.ndarray:
    """Counts of shape ``(K, 2, bins)``: K = 1 (binary) or C; ``[k, 0]`` positives, ``[k, 1]`` the rest."""
    n_classes = probs.shape[1]
    classes = [1] if n_classes == 2 else list(range(n_classes))
    out = np.zeros((len(classes), 2, bins), dtype=np.int64)
    for k, c in enumerate(classes):
        idx = np.clip((probs[:, c] * bins).astype(np.int64), 0, bins - 1)
        pos = targets == c
        out[k, 0] = np.bincount(idx[pos], minlength=bins)
        out[k, 1] = np.bincount(idx[~pos], minlength=bins)
    return out


def binned_auc(pos: np.ndarray, neg: np.ndarray) -> float:
    """AUC from positive/negative counts per score bin (ascending scores); ties within a bin count 1/2."""
    n_pos, n_neg = pos.sum(), neg.sum()
    if n_pos == 0 or n_neg == 0:
        return math.nan
    neg_below = np.cumsum(neg) - neg
    return float((pos * (neg_below + 0.5 * neg)).sum() / (n_pos * n_neg))


def histogram_auc(hist: np.ndarray) -> float:
    """Macro AUC over the ``(K, 2, bins)`` histograms; NaN if a class has no positives or negatives."""
    aucs = [binned_auc(h[0], h[1]) for h in hist]
    return float(np.mean(aucs)) if not any(math.isnan(a) for a in aucs) else math.nan


def confusion(targets: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """``(C, C)`` counts, rows = true class, columns = argmax prediction."""
    n = probs.shape[1]
    return np.bincount(targets * n + probs.argmax(1), minlength=n * n).reshape(n, n)


def confusion_metrics(cm: np.ndarray) -> dict[str, float]:
    total = cm.sum()
    per_class = [cm[i, i] / cm[i].sum() for i in range(len(cm)) if cm[i].sum() > 0]
    return {
        "accuracy": float(np.trace(cm) / total) if total else math.nan,
        "balanced-accuracy": float(np.mean(per_class)) if per_class else math.nan,
    }
