"""Federated vs pooled vs each site's local model, on the same held-out slides of every site.

The question a federation must answer is whether joining was worth it: is the
federated model as good as pooling everyone's slides (which the hospitals
cannot do) and better than what each hospital trains alone? All models here
are scored on one test set, the union of every site's held-out split (the
splits are made per site, so every training mode holds out the same slides),
with scikit-learn's AUC on per-slide scores: this runs where the test slides
are, as an evaluation the hospitals agree to, not inside the federation.

Each AUC comes with a 95 % percentile bootstrap interval over the test slides.
Every model is resampled with the same seed, hence the same slide resamples, so
the intervals differ only by the models (a few dozen slides make them wide: a
difference inside them is no evidence).
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
from wsi_fl.evaluation.metrics import bootstrap_ci
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
    ci: tuple[float, float] | None = None  # 95 % bootstrap interval of the AUC (None: not computed or undefined)

    @property
    def n_positive(self) -> int:
        """Test slides of the last class (the positive one of a binary task)."""
        return int((self.targets == self.probs.shape[1] - 1).sum())


def auc_interval(targets: np.ndarray, probs: np.ndarray, n_bootstrap: int, seed: int) -> tuple[float, float] | None:
    """95 % percentile bootstrap interval of the AUC (:func:`wsi_fl.evaluation.metrics.bootstrap_ci`)."""
    if n_bootstrap <= 0 or len(np.unique(targets)) < probs.shape[1]:
        return None
    stat = (lambda y, p: roc_auc_score(y, p[:, 1])) if probs.shape[1] == 2 else (
        lambda y, p: roc_auc_score(y, p, multi_class="ovr", labels=np.arange(p.shape[1])))
    lo, hi, used = bootstrap_ci(stat, targets, probs, n_bootstrap, seed)
    return None if not used else (float(lo), float(hi))


def held_out_records(sites: Sequence[Site], *, label_col: str, val_frac: float, test_frac: float, seed: int,
                     classes: Sequence[str] | None = None):
    """Every site's held-out test records (the split :func:`wsi_fl.mil.fit.fit` and the ClientApp make)."""
    pairs, classes = load_site_records(sites, label_col, classes)
    test = assign_site_splits(pairs, val_frac, test_frac, seed).get("test", np.zeros(0, int))
    return [pairs[int(i)] for i in test], classes


def score_models(models: Mapping[str, str | Path], sites: Sequence[Site], *, label_col: str = "label",
                 val_frac: float = 0.15, test_frac: float = 0.2, seed: int = 0,
                 n_bootstrap: int = 1000) -> list[Scored]:
    """Each checkpoint's predictions on the union of the sites' test splits, AUC with a bootstrap 95 % CI."""
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
                          preds.targets, preds.probs, auc_interval(preds.targets, preds.probs, n_bootstrap, seed)))
    return out


def format_table(scored: Sequence[Scored]) -> str:
    lines = [f"{'model':<22}{'test AUC':>9}  {'95% CI':<11}{'accuracy':>9}{'slides':>8}{'pos':>5}"]
    for s in scored:
        ci = f"{s.ci[0]:.2f}-{s.ci[1]:.2f}" if s.ci else "-"
        lines.append(f"{s.name:<22}{s.auc:>9.3f}  {ci:<11}{s.accuracy:>9.3f}{s.n:>8}{s.n_positive:>5}")
    return "\n".join(lines)


def plot_comparison(scored: Sequence[Scored], path: str | os.PathLike, unseen: Sequence | None = None) -> Path:
    """ROC curves of every model on the shared test set, their AUCs as bars with 95 % CIs and, given ``unseen``
    (:class:`wsi_fl.evaluation.unseen.UnseenResult` rows), each held-out site's unseen-site AUCs by mode."""
    fig = Figure(figsize=(15 if unseen else 10, 4.5))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 3 if unseen else 2)
    roc_ax, bar_ax = axes[0], axes[1]
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
    errors = np.array([[s.auc - s.ci[0], s.ci[1] - s.auc] if s.ci else [0.0, 0.0] for s in scored]).T
    bar_ax.barh(names, [s.auc for s in scored], xerr=errors if len(scored) else None, capsize=3,
                color=["C0" if "federated" in n else "C1" if "pooled" in n else "C7" for n in names])
    bar_ax.set(xlim=(0, 1), xlabel="test AUC (95% CI)", title="federated vs pooled vs local")
    bar_ax.invert_yaxis()
    if unseen:
        _plot_unseen(axes[2], unseen)
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, path)


def _plot_unseen(ax, unseen: Sequence) -> None:
    sites = list(dict.fromkeys(r.held_out for r in unseen))
    modes = list(dict.fromkeys(r.mode for r in unseen))
    width = 0.8 / len(modes)
    for j, mode in enumerate(modes):
        rows = {r.held_out: r for r in unseen if r.mode == mode}
        ys = [i + (j - (len(modes) - 1) / 2) * width for i, site in enumerate(sites) if site in rows]
        got = [rows[site] for site in sites if site in rows]
        err = np.array([[r.auc - r.ci[0], r.ci[1] - r.auc] if r.ci else [0.0, 0.0] for r in got]).T
        ax.barh(ys, [r.auc for r in got], height=width, xerr=err, capsize=3, label=mode,
                color="C0" if mode == "federated" else "C1")
    ax.set_yticks(range(len(sites)), sites)
    ax.set(xlim=(0, 1), xlabel="AUC on every slide of the site (95% CI)",
           title="unseen site: trained on the other sites")
    ax.invert_yaxis()
    ax.legend(loc="lower right", fontsize="small")
