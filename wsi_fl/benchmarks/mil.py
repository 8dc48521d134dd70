"""Repeated stratified k-fold cross-validation on a classic MIL bag table (Musk1/2, Fox, Tiger...).

This is how the model family is checked against published numbers on data no
one here made. Protocol (one configuration for every dataset, no per-dataset
tuning): for each repeat, bags are split into ``folds`` stratified folds; every
training bag trains for a fixed 40 epochs (a configuration with early stopping
instead splits the training bags 90/10 to pick the epoch); features are standardised with statistics of the
training instances only; the held-out fold gives accuracy (argmax) and AUC.
Reported: mean ± std over repeats of the fold-averaged accuracy (as Ilse et
al. report), the std over all folds, and every fold's values.
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
from wsi_fl.mil.data import TableBagDataset
from wsi_fl.mil.splits import patient_kfold, train_val_split
from wsi_fl.mil.training import auc_score, predict, train_model


def standardise(train: TableBagDataset, *others: TableBagDataset) -> list[TableBagDataset]:
    """Z-score every dataset with the mean/std of the training instances (std floor avoids /0)."""
    stacked = torch.cat(train.features)
    mean, std = stacked.mean(0), stacked.std(0).clamp_min(1e-6)
    return [TableBagDataset([(f - mean) / std for f in ds.features], ds.targets, ds.groups, ds.classes)
            for ds in (train, *others)]


def run_fold(data: TableBagDataset, train_idx: np.ndarray, test_idx: np.ndarray, cfg: BenchmarkConfig,
             seed: int) -> dict[str, float]:
    if cfg.train.early_stopping == "none":  # a fixed number of epochs: every training bag trains
        train_ds, test_ds = standardise(data.subset(train_idx), data.subset(test_idx))
        val_ds = None
    else:
        inner_train, inner_val = train_val_split(data.targets[train_idx], data.groups[train_idx], cfg.val_frac, seed)
        train_ds, val_ds, test_ds = standardise(data.subset(train_idx[inner_train]),
                                                data.subset(train_idx[inner_val]), data.subset(test_idx))
    torch.manual_seed(seed)
    model = create_model(replace(cfg.mil, model=cfg.model, in_dim=data.feature_dim, n_classes=len(data.classes)))
    result = train_model(model, train_ds, val_ds, replace(cfg.train, seed=seed, device="cpu"))
    preds = predict(result.model, test_ds)
    accuracy = float((preds.probs.argmax(1) == preds.targets).mean())
    return {"accuracy": accuracy, "auc": auc_score(preds.targets, preds.probs), "best_epoch": result.best_epoch}


def _mean_std(values: list[float]) -> tuple[float, float]:
    arr = np.asarray([v for v in values if not math.isnan(v)], dtype=np.float64)
    if arr.size == 0:
        return math.nan, math.nan
    return float(arr.mean()), float(arr.std(ddof=1)) if arr.size > 1 else 0.0


def run_mil_benchmark(csv_path: str | Path, cfg: BenchmarkConfig = BenchmarkConfig(),
                      progress: bool = True) -> dict:
    """Run the protocol; returns a JSON-serialisable summary."""
    start = time.perf_counter()
    data = TableBagDataset.from_csv(csv_path)
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
            fold = run_fold(data, train_idx, test_idx, cfg, seed=cfg.seed + 1000 * r + k)
            per_fold.append({"repeat": r, "fold": k, "n_test": len(test_idx), **fold})
    finally:
        torch.set_num_threads(previous_threads)
    repeat_acc = [float(np.mean([f["accuracy"] for f in per_fold if f["repeat"] == r])) for r in range(cfg.repeats)]
    repeat_auc = [float(np.nanmean([f["auc"] for f in per_fold if f["repeat"] == r])) for r in range(cfg.repeats)]
    acc_mean, acc_std = _mean_std(repeat_acc)
    auc_mean, auc_std = _mean_std(repeat_auc)
    return {
        "dataset": Path(csv_path).stem,
        "model": cfg.model,
        "bags": len(data),
        "folds": cfg.folds,
        "repeats": cfg.repeats,
        "seed": cfg.seed,
        "accuracy_mean": round(acc_mean, 4),
        "accuracy_std": round(acc_std, 4),
        "accuracy_fold_std": round(_mean_std([f["accuracy"] for f in per_fold])[1], 4),
        "auc_mean": round(auc_mean, 4),
        "auc_std": round(auc_std, 4),
        "per_repeat_accuracy": [round(a, 4) for a in repeat_acc],
        "per_fold": per_fold,
        "train_config": cfg.train.to_dict(),
        "model_config": {k: v for k, v in cfg.mil.to_dict().items() if k not in ("model", "in_dim", "n_classes")},
        "seconds": round(time.perf_counter() - start, 1),
    }
