"""Validation on an unseen hospital: leave one site out, train on the others, score every slide of the one left out.

Why: every other figure of this project scores held-out *slides of the training sites*, which share those
hospitals' scanners, stains and case mix. A model shipped to a new hospital meets none of them; leaving a whole
site out of training is the honest estimate of that. For every site S of a cohort directory (one sub-directory
per site with ``features/`` and ``labels.csv``, the layout :func:`wsi_fl.site.data.discover_cohort` reads):

* ``pooled``: :func:`wsi_fl.mil.fit.fit` on all slides of the other sites (no val/test split inside them:
  ``val_frac = test_frac = 0``; the :class:`TrainConfig` as given, so give it a fixed number of epochs);
* ``federated``: the real Flower ServerApp and ClientApp over the other sites only, in-process
  (:class:`wsi_fl.engines.inline.InlineGrid`; the same results as the simulation engine), on a cohort
  directory of links to those sites alone (:func:`subset_cohort`), so S cannot take part; each site trains on
  all its slides (``val-frac = test-frac = 0``) and the last round's model is scored (``select-on = last``);

then both are scored on *all* slides of S: AUC with a bootstrap 95 % interval
(:func:`wsi_fl.evaluation.metrics.classification_metrics`). Written under ``out_dir``: ``<S>/<mode>/`` (the
model and, per mode, ``metrics.json`` and ``predictions.csv`` of S's slides) and ``unseen.csv``.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from models.checkpoint import check_provenance, load_checkpoint
from preprocessing.atomic import write_csv_atomic, write_text_atomic
from wsi_fl.errors import ConfigError
from wsi_fl.evaluation.evaluate import write_predictions
from wsi_fl.evaluation.metrics import classification_metrics
from wsi_fl.federation.config import FedConfig
from wsi_fl.mil.fit import Site, build_dataset, fit, load_site_records
from wsi_fl.mil.splits import leave_one_site_out as site_folds
from wsi_fl.mil.training import TrainConfig, predict
from wsi_fl.site.data import discover_cohort

MODES = ("pooled", "federated")
CSV_HEADER = ("held_out", "mode", "auc", "ci_low", "ci_high", "n_slides", "n_positive")


@dataclass(frozen=True)
class UnseenResult:
    """One model's score on every slide of a site it never saw (``n_positive``: slides of the last class)."""

    held_out: str
    mode: str  # "pooled" or "federated"
    auc: float  # NaN when the site has slides of one class only
    ci: tuple[float, float] | None
    n_slides: int
    n_positive: int


def subset_cohort(cohort_dir: Path, site_names: Sequence[str], dest: Path) -> Path:
    """``dest`` as a cohort directory holding links to only ``site_names`` of ``cohort_dir`` (replaced if there).

    A simulated federation serves every site of the directory it is given (partition ids index its sites), so a
    directory without the held-out site is what keeps that site out of the federation, whichever engine runs it.
    """
    dest.mkdir(parents=True, exist_ok=True)
    for old in dest.iterdir():
        if old.is_symlink():
            old.unlink()
        else:
            raise ConfigError(f"{dest}: not a directory of site links ({old.name} is not a link)")
    for name in site_names:
        src = (Path(cohort_dir) / name).resolve()
        if not ((src / "labels.csv").is_file() and (src / "features").is_dir()):
            raise ConfigError(f"{src}: not a site directory (needs labels.csv and features/)")
        (dest / name).symlink_to(src, target_is_directory=True)
    return dest


def run_federation(cohort: Path, cfg: FedConfig) -> Path:
    """``cfg`` over every site of ``cohort`` through the real ServerApp/ClientApp in this process; the last model."""
    from wsi_fl.engines.inline import InlineGrid
    from wsi_fl.server.loop import run_server
    from wsi_fl.site.app import make_client_app

    n = len(discover_cohort(cohort))
    cfg = replace(cfg, min_available_nodes=min(cfg.min_available_nodes, n), min_train_nodes=min(cfg.min_train_nodes, n),
                  min_evaluate_nodes=min(cfg.min_evaluate_nodes, n))
    run_server(InlineGrid(make_client_app(cohort), [{"partition-id": i} for i in range(n)]), cfg)
    return Path(cfg.out_dir) / "last.pt"


def score_site(checkpoint: Path, site: Site, out_dir: Path, *, label_col: str, n_bootstrap: int,
               seed: int) -> tuple[float, tuple[float, float] | None, int, int]:
    """(AUC, 95 % CI, slides, slides of the last class) of ``checkpoint`` on every slide of ``site``.

    Also writes ``out_dir/metrics.json`` and ``out_dir/predictions.csv``.
    """
    model, ckpt = load_checkpoint(checkpoint)
    pairs, classes = load_site_records([site], label_col, ckpt.classes)
    if not pairs:
        raise ConfigError(f"{site.labels}: site {site.name} has no slide to score")
    dataset = build_dataset(pairs, np.arange(len(pairs)), max_instances=None, seed=seed)
    check_provenance(ckpt.provenance, dataset.provenance, f"slides of the held-out site {site.name}")
    preds = predict(model, dataset)
    metrics = classification_metrics(preds.targets, preds.probs, classes=classes, n_bootstrap=n_bootstrap, seed=seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_predictions(out_dir / "predictions.csv", preds, [r for _, r in pairs], classes)
    write_text_atomic(out_dir / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    auc = math.nan if metrics["auc"] is None else float(metrics["auc"])
    ci = None if metrics["auc_ci95"] is None else (float(metrics["auc_ci95"][0]), float(metrics["auc_ci95"][1]))
    return auc, ci, len(preds.targets), int((preds.targets == len(classes) - 1).sum())


def leave_one_site_out(cohort_dir: Path, out_dir: Path, *, train: TrainConfig, fed: FedConfig,
                       modes: Sequence[str] = MODES, sites: Sequence[str] | None = None, n_bootstrap: int = 1000,
                       progress: bool = False) -> list[UnseenResult]:
    """For each site (of ``sites``, default all) held out: each of ``modes`` trained on the others, scored on it.

    Pooled training takes its model architecture from ``fed`` (the MILConfig fields of a FedConfig), so both
    modes train the same network. Writes ``out_dir/unseen.csv`` (:func:`write_unseen_csv`) and returns the rows.
    """
    cohort_dir, out_dir = Path(cohort_dir), Path(out_dir)
    unknown_modes = sorted(set(modes) - set(MODES))
    if unknown_modes or not modes:
        raise ConfigError(f"unseen-site modes must be among {', '.join(MODES)}, not {', '.join(unknown_modes)}")
    all_sites = {s.name: s for s in discover_cohort(cohort_dir)}
    wanted = list(sites) if sites is not None else list(all_sites)
    missing = [s for s in wanted if s not in all_sites]
    if missing:
        raise ConfigError(f"{cohort_dir}: no site {missing[0]!r} (sites: {', '.join(all_sites)})")
    folds = [(held, rest) for held, rest in site_folds(list(all_sites)) if held in wanted]
    model = fed.mil_config(1, 2)  # in_dim and n_classes come from the data (fit sets them)
    results = []
    for held, rest in folds:
        fold = out_dir / held
        for mode in modes:
            if mode == "pooled":
                checkpoint = fit([all_sites[s] for s in rest], fold / "pooled", model=model, train=train,
                                 label_col=fed.label_col, val_frac=0.0, test_frac=0.0, progress=progress).checkpoint
            else:
                cohort = subset_cohort(cohort_dir, rest, fold / "cohort")
                cfg = replace(fed, val_frac=0.0, test_frac=0.0, select_on="last", resume=False,
                              out_dir=str(fold / "federated"))
                checkpoint = run_federation(cohort, cfg)
            auc, ci, n, n_pos = score_site(checkpoint, all_sites[held], fold / mode / "unseen",
                                           label_col=fed.label_col, n_bootstrap=n_bootstrap, seed=train.seed)
            results.append(UnseenResult(held, mode, auc, ci, n, n_pos))
            if progress:
                interval = f" (95% CI {ci[0]:.3f}-{ci[1]:.3f})" if ci else ""
                print(f"unseen {held}: {mode} trained on {', '.join(rest)}: AUC {auc:.3f}{interval}, "
                      f"{n} slides, {n_pos} positive", flush=True)
    write_unseen_csv(results, out_dir / "unseen.csv")
    return results


def write_unseen_csv(results: Sequence[UnseenResult], path: Path) -> None:
    """One row per (held-out site, mode); written atomically (a reader never sees half a table)."""
    def num(x: float) -> str:
        return "" if x is None or math.isnan(x) else f"{x:.4f}"

    rows = [(r.held_out, r.mode, num(r.auc), num(r.ci[0]) if r.ci else "", num(r.ci[1]) if r.ci else "",
             r.n_slides, r.n_positive) for r in results]
    os.makedirs(Path(path).parent, exist_ok=True)
    write_csv_atomic(path, CSV_HEADER, rows)
