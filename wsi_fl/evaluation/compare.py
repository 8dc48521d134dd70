"""Federated vs pooled vs each site's local model, on the same held-out slides of every site.

The question a federation must answer is whether joining was worth it: is the
federated model as good as pooling everyone's slides (which the hospitals
cannot do) and better than what each hospital trains alone? All models here
are scored on one test set, the union of every site's held-out split (the
splits are made per site, so every training mode holds out the same slides),
with scikit-learn's AUC on per-slide scores: this runs where the test slides
are, as an evaluation the hospitals agree to, not inside the federation.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from sklearn.metrics import roc_auc_score, roc_curve

from models.checkpoint import check_provenance, load_checkpoint
from wsi_fl.evaluation.plots import save_figure
from wsi_fl.mil.fit import Site, assign_site_splits, build_dataset, load_site_records
from wsi_fl.mil.training import auc_score, predict


@dataclass(frozen=True)
class Scored:
    name: str
    auc: float
    accuracy: float
    n: int
    targets: np.ndarray
    probs: np.ndarray


def held_out_records(sites: Sequence[Site], *, label_col: str, val_frac: float, test_frac: float, seed: int,
                     classes: Sequence[str] | None = None):
    """Every site's held-out test records (the split :func:`wsi_fl.mil.fit.fit` and the ClientApp make)."""
    pairs, classes = load_site_records(sites, label_col, classes)
    test = assign_site_splits(pairs, val_frac, test_frac, seed).get("test", np.zeros(0, int))
    return [pairs[int(i)] for i in test], classes


def score_models(models: Mapping[str, str | Path], sites: Sequence[Site], *, label_col: str = "label",
                 val_frac: float = 0.15, test_frac: float = 0.2, seed: int = 0) -> list[Scored]:
    """Each checkpoint's predictions on the union of the sites' test splits."""
    out = []
    for name, path in models.items():
        model, ckpt = load_checkpoint(path)
        pairs, _ = held_out_records(sites, label_col=label_col, val_frac=val_frac, test_frac=test_frac, seed=seed,
                                    classes=ckpt.classes)
        dataset = build_dataset(pairs, np.arange(len(pairs)), max_instances=None, seed=seed)
        if dataset is None:
            raise ValueError("no test slides: every site needs a test split (test_frac > 0)")
        check_provenance(ckpt.provenance, dataset.provenance, f"test slides scored by {name}")
        preds = predict(model, dataset)
        accuracy = float((preds.probs.argmax(1) == preds.targets).mean())
        out.append(Scored(name, auc_score(preds.targets, preds.probs), accuracy, len(preds.targets),
                          preds.targets, preds.probs))
    return out


def format_table(scored: Sequence[Scored]) -> str:
    lines = [f"{'model':<22}{'test AUC':>9}{'accuracy':>10}{'slides':>8}"]
    lines += [f"{s.name:<22}{s.auc:>9.3f}{s.accuracy:>10.3f}{s.n:>8}" for s in scored]
    return "\n".join(lines)


def plot_comparison(scored: Sequence[Scored], path: str | os.PathLike) -> Path:
    """ROC curves of every model on the shared test set, and their AUCs as bars."""
    fig = Figure(figsize=(10, 4.5))
    FigureCanvasAgg(fig)
    roc_ax, bar_ax = fig.subplots(1, 2)
    roc_ax.plot([0, 1], [0, 1], linestyle="--", color="0.6", linewidth=1)
    for s in scored:
        if s.probs.shape[1] == 2 and 0 < s.targets.sum() < len(s.targets):
            fpr, tpr, _ = roc_curve(s.targets, s.probs[:, 1])
            roc_ax.plot(fpr, tpr, drawstyle="steps-post", linewidth=2,
                        label=f"{s.name} ({roc_auc_score(s.targets, s.probs[:, 1]):.3f})")
    roc_ax.set(xlabel="false positive rate", ylabel="true positive rate", aspect="equal",
               title=f"held-out slides of all sites (n = {scored[0].n if scored else 0})")
    roc_ax.legend(loc="lower right", fontsize="small")
    names = [s.name for s in scored]
    bar_ax.barh(names, [s.auc for s in scored], color=["C0" if "federated" in n else "C1" if "pooled" in n
                                                         else "C7" for n in names])
    bar_ax.set(xlim=(0, 1), xlabel="test AUC", title="federated vs pooled vs local")
    bar_ax.invert_yaxis()
    for ax in (roc_ax, bar_ax):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, path)
