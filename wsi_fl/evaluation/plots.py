"""Report figures: ROC curves and reliability diagrams, written as PNG.

Figures are built on :class:`matplotlib.figure.Figure` with the Agg canvas
directly, never through ``pyplot``: no global figure registry to leak memory
across many evaluations, no GUI backend picked up from the environment, and safe
to call from worker threads. Each file is written under a temporary name and
renamed, so a report never links a half-written image.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from sklearn.metrics import roc_auc_score, roc_curve

from preprocessing.atomic import atomic_path
from wsi_fl.evaluation.metrics import calibration_bins, check_inputs

__all__ = ["plot_calibration", "plot_roc", "save_figure"]

_DPI = 120


def save_figure(fig: Figure, path: str | os.PathLike) -> Path:
    """Render ``fig`` to PNG at ``path`` atomically (temporary name in the same directory, then rename)."""
    FigureCanvasAgg(fig)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=_DPI)
    return Path(path)


def _chance_line(ax) -> None:
    ax.plot([0, 1], [0, 1], linestyle="--", color="0.6", linewidth=1, label="chance")


def plot_roc(
    y_true: np.ndarray,
    probs: np.ndarray,
    path: str | os.PathLike,
    *,
    classes: Sequence[str],
    title: str = "",
) -> Path:
    """ROC curve(s): binary, one curve of P(class 1) with its AUC; multi-class, one one-vs-rest curve per class.

    A class whose curve is undefined (absent from, or the only class in,
    ``y_true``) is listed in the legend as undefined rather than failing.
    """
    classes = [str(c) for c in classes]
    y, p = check_inputs(y_true, probs, len(classes))
    fig = Figure(figsize=(5.5, 5))
    ax = fig.add_subplot()
    _chance_line(ax)
    targets = [1] if len(classes) == 2 else range(len(classes))
    for k in targets:
        yk = (y == k).astype(np.int64)
        label = classes[k] if len(classes) > 2 else f"{classes[1]} vs {classes[0]}"
        if 0 < yk.sum() < len(yk):
            fpr, tpr, _ = roc_curve(yk, p[:, k])
            auc = roc_auc_score(yk, p[:, k])
            ax.plot(fpr, tpr, linewidth=2, drawstyle="steps-post", label=f"{label} (AUC {auc:.3f})")
        else:
            ax.plot([], [], linewidth=2, label=f"{label} (AUC undefined: one class only)")
    ax.set(xlim=(-0.01, 1.01), ylim=(-0.01, 1.01), xlabel="False positive rate (1 - specificity)",
           ylabel="True positive rate (sensitivity)", aspect="equal")
    ax.set_title(title or f"ROC (n = {len(y)})")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize="small")
    fig.tight_layout()
    return save_figure(fig, path)


def plot_calibration(
    y_true: np.ndarray,
    probs: np.ndarray,
    path: str | os.PathLike,
    *,
    n_bins: int = 10,
    title: str = "",
) -> Path:
    """Reliability diagram over uniform bins, with a histogram of the predictions underneath.

    Binary: observed frequency of class 1 against P(class 1). Multi-class:
    accuracy against top-class confidence (the same data as the ``calibration``
    entry of :func:`.metrics.classification_metrics`).
    """
    y, p = check_inputs(y_true, probs)
    if p.shape[1] == 2:
        target, prob = (y == 1).astype(np.int64), p[:, 1]
        xlabel, ylabel = "Predicted P(class 1)", "Observed fraction of class 1"
    else:
        pred = p.argmax(axis=1)
        target, prob = (pred == y).astype(np.int64), p.max(axis=1)
        xlabel, ylabel = "Top-class confidence", "Observed accuracy"
    bins = calibration_bins(target, prob, n_bins)

    fig = Figure(figsize=(5.5, 6.5))
    ax, hist = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    ax.plot([0, 1], [0, 1], linestyle="--", color="0.6", linewidth=1, label="perfectly calibrated")
    ax.plot(bins["prob_pred"], bins["prob_true"], marker="o", linewidth=2, label="model")
    ax.set(xlim=(0, 1), ylim=(-0.02, 1.02), ylabel=ylabel)
    ax.set_title(title or f"Calibration (n = {len(y)}, {n_bins} bins)")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize="small")
    hist.hist(prob, bins=np.linspace(0.0, 1.0, n_bins + 1), color="C0", edgecolor="white")
    hist.set(xlabel=xlabel, ylabel="Slides")
    fig.tight_layout()
    return save_figure(fig, path)


def plot_federated_history(history: Sequence[dict], path: str | os.PathLike) -> Path:
    """Per-round federated metrics: training and validation loss, validation and test AUC."""
    fig = Figure(figsize=(9, 3.5))
    FigureCanvasAgg(fig)
    loss_ax, auc_ax = fig.subplots(1, 2)
    rounds = [h["round"] for h in history]
    for key, ax in (("train-loss", loss_ax), ("val-loss", loss_ax), ("val-auc", auc_ax), ("test-auc", auc_ax)):
        values = [h.get(key, np.nan) for h in history]
        if not all(np.isnan(values)):
            ax.plot(rounds, values, marker=".", label=key)
    loss_ax.set(xlabel="round", ylabel="loss", title="loss")
    auc_ax.set(xlabel="round", ylabel="AUC", title="federated AUC (from site histograms)", ylim=(0, 1.02))
    for ax in (loss_ax, auc_ax):
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)
