"""Repeated stratified k-fold cross-validation on a classic MIL bag table (Musk1/2, Fox, Tiger...).

This is how the model family is checked against published numbers on data no
one here made. Protocol (one configuration for every dataset, no per-dataset
tuning): for each repeat, bags are split into ``folds`` stratified folds; every
training bag trains for a fixed 40 epochs (a configuration with early stopping
instead splits the training bags 90/10 to pick the epoch); features are standardised with statistics of the
training instances only; the held-out fold gives accuracy (argmax) and AUC.
Reported: mean ± std over repeats of the fold-averaged accuracy (as Ilse et
al. report), the std over all folds, and every fold's values.

``tune=True`` replaces the fixed settings by nested cross-validation (:mod:`wsi_fl.mil.tuning`): inside each
outer fold, a small grid is scored on inner folds of that fold's training bags, and the chosen settings are
refit on all of them before the outer test fold is scored once. ``task="survival"`` reads a
``time,event,bag,...`` table, trains a Cox head (risk sets of 32 bags) and reports Harrell's C-index instead.
"""

from __future__ import annotations

import math
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from models import create_model
from wsi_fl.benchmarks.mil_config import BenchmarkConfig  # stdlib-only, for the CLI; importable from here too
from wsi_fl.mil import tuning
from wsi_fl.mil.splits import patient_kfold, train_val_split
from wsi_fl.mil.tables import TableBagDataset
from wsi_fl.mil.training import auc_score, predict, predict_risk, survival_outputs, train_model
from wsi_fl.mil.tuning import TuneGrid, TuneResult, tune


def standardise(train: TableBagDataset, *others: TableBagDataset) -> list[TableBagDataset]:
    """Z-score every dataset with the mean/std of the training instances (std floor avoids /0)."""
    stacked = torch.cat(train.features)
    mean, std = stacked.mean(0), stacked.std(0).clamp_min(1e-6)
    return [TableBagDataset([(f - mean) / std for f in ds.features], ds.targets, ds.groups, ds.classes,
                            times=getattr(ds, "times", None), events=getattr(ds, "events", None))
            for ds in (train, *others)]


def tune_fold(data: TableBagDataset, train_idx: np.ndarray, cfg: BenchmarkConfig, seed: int,
              grid: TuneGrid | None = None) -> TuneResult:
    """Nested CV of one outer fold: only ``train_idx``'s bags are ever read (each inner split standardised
    with its own inner training bags)."""
    train_idx = np.asarray(train_idx)

    def make_sets(inner_train: np.ndarray, inner_val: np.ndarray) -> tuple[TableBagDataset, TableBagDataset]:
        tr, va = standardise(data.subset(train_idx[inner_train]), data.subset(train_idx[inner_val]))
        return tr, va

    model_cfg = replace(cfg.mil, model=cfg.model, in_dim=data.feature_dim, n_classes=len(data.classes))
    return tune(data.targets[train_idx], data.groups[train_idx], make_sets, model_cfg,
                replace(cfg.train_config, device="cpu"), grid, seed)


def run_fold(data: TableBagDataset, train_idx: np.ndarray, test_idx: np.ndarray, cfg: BenchmarkConfig,
             seed: int, grid: TuneGrid | None = None) -> dict:
    train_cfg, model_cfg, chosen = cfg.train_config, replace(cfg.mil, model=cfg.model), None
    if cfg.tune:  # settings from the training bags alone; then refit on all of them, fixed epochs
        chosen = tune_fold(data, train_idx, cfg, seed, grid)
        model_cfg, train_cfg = chosen.apply(model_cfg, replace(train_cfg, early_stopping="none"))
    if train_cfg.early_stopping == "none":  # a fixed number of epochs: every training bag trains
        train_ds, test_ds = standardise(data.subset(train_idx), data.subset(test_idx))
        val_ds = None
    else:
        inner_train, inner_val = train_val_split(data.targets[train_idx], data.groups[train_idx], cfg.val_frac, seed)
        train_ds, val_ds, test_ds = standardise(data.subset(train_idx[inner_train]),
                                                data.subset(train_idx[inner_val]), data.subset(test_idx))
    train_cfg = replace(train_cfg, seed=seed, device="cpu")
    survival = cfg.task == "survival"
    n_out = survival_outputs(train_ds, train_cfg)[0] if survival else len(data.classes)
    torch.manual_seed(seed)
    model = create_model(replace(model_cfg, in_dim=data.feature_dim, n_classes=n_out))
    result = train_model(model, train_ds, val_ds, train_cfg)
    extra = {"chosen": chosen.best, "inner_score": round(chosen.score, 4)} if chosen else {}
    if survival:
        from wsi_fl.evaluation.survival import harrell_c

        kind = result.bin_edges if train_cfg.survival_loss == "discrete" else "cox"
        sp = predict_risk(result.model, test_ds, kind)
        return {"c_index": harrell_c(sp.time, sp.event, sp.risk), "best_epoch": result.best_epoch, **extra}
    preds = predict(result.model, test_ds)
    accuracy = float((preds.probs.argmax(1) == preds.targets).mean())
    return {"accuracy": accuracy, "auc": auc_score(preds.targets, preds.probs), "best_epoch": result.best_epoch,
            **extra}


def _mean_std(values: list[float]) -> tuple[float, float]:
    arr = np.asarray([v for v in values if not math.isnan(v)], dtype=np.float64)
    if arr.size == 0:
        return math.nan, math.nan
    return float(arr.mean()), float(arr.std(ddof=1)) if arr.size > 1 else 0.0


def _summary(per_fold: list[dict], metric: str, repeats: int) -> dict[str, float]:
    """``<metric>_mean/_std`` over repeats of the fold-averaged metric, and ``<metric>_fold_std`` over folds."""
    per_repeat = [float(np.nanmean([f[metric] for f in per_fold if f["repeat"] == r] or [math.nan]))
                  for r in range(repeats)]
    mean, std = _mean_std(per_repeat)
    return {f"{metric}_mean": round(mean, 4), f"{metric}_std": round(std, 4),
            f"{metric}_fold_std": round(_mean_std([f[metric] for f in per_fold])[1], 4),
            f"per_repeat_{metric}": [round(a, 4) for a in per_repeat]}


def run_mil_benchmark(csv_path: str | Path, cfg: BenchmarkConfig = BenchmarkConfig(),
                      progress: bool = True, grid: TuneGrid | None = None) -> dict:
    """Run the protocol; returns a JSON-serialisable summary. ``grid``: the nested-CV grid with
    ``cfg.tune`` (default :data:`wsi_fl.mil.tuning.DEFAULT_GRID`, read at call time)."""
    grid = grid or tuning.DEFAULT_GRID
    start = time.perf_counter()
    data = TableBagDataset.from_csv(csv_path, task=cfg.task)
    previous_threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    per_fold: list[dict] = []
    try:
        jobs = [(r, k, tr, te) for r in range(cfg.repeats)
                for k, (tr, te) in enumerate(patient_kfold(data.targets, data.groups, cfg.folds, cfg.seed + r))]
        if progress:
            from tqdm.auto import tqdm

            jobs = tqdm(jobs, desc=Path(csv_path).stem, unit="fold")
        for r, k, train_idx, test_idx in jobs:
            fold = run_fold(data, train_idx, test_idx, cfg, seed=cfg.seed + 1000 * r + k, grid=grid)
            per_fold.append({"repeat": r, "fold": k, "n_test": len(test_idx), **fold})
    finally:
        torch.set_num_threads(previous_threads)
    metrics = ("c_index",) if cfg.task == "survival" else ("accuracy", "auc")
    summary: dict = {}
    for metric in metrics:
        summary.update(_summary(per_fold, metric, cfg.repeats))
    if cfg.task == "classification":  # the keys of earlier versions' output
        summary.pop("auc_fold_std"), summary.pop("per_repeat_auc")
    return {
        "dataset": Path(csv_path).stem,
        "model": cfg.model,
        "task": cfg.task,
        "tuned": cfg.tune,
        "bags": len(data),
        "folds": cfg.folds,
        "repeats": cfg.repeats,
        "seed": cfg.seed,
        **summary,
        "per_fold": per_fold,
        "train_config": cfg.train_config.to_dict(),
        "model_config": {k: v for k, v in cfg.mil.to_dict().items() if k not in ("model", "in_dim", "n_classes")},
        **({"tune_grid": grid.to_dict()} if cfg.tune else {}),
        "seconds": round(time.perf_counter() - start, 1),
    }
