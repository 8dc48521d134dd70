"""Train and run an attention-MIL model on bags: the loop shared by local, pooled and federated training.

Kept free of I/O and of where bags come from: it takes torch datasets whose
items are :class:`wsi_fl.mil.data.Bag`, so the same code trains on one hospital's
HDF5 files, on several hospitals' pooled, on a bag-table benchmark, and (in a
later issue) inside a Flower ClientApp.
"""

from __future__ import annotations

import copy
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from torch.utils.data import DataLoader, Dataset

from models import MILModel
from wsi_fl.errors import ConfigError
from wsi_fl.mil.config import TrainConfig  # defined beside the other stdlib-only settings; importable from here too
from wsi_fl.mil.data import BagBatch, collate_bags
from wsi_fl.mil.survival import (
    COX_CENTRING,
    cox_loss,
    discrete_time_bins,
    discrete_time_loss,
    log_risk,
    risk,
    time_bins,
)


@dataclass
class TrainResult:
    model: MILModel  # with the weights of the selected epoch
    best_epoch: int
    history: list[dict[str, float]]
    bin_edges: np.ndarray | None = None  # discrete-time survival: the time-bin edges the head's outputs stand for


@dataclass
class Predictions:
    slide_ids: list[str]
    targets: np.ndarray  # (n,) int
    probs: np.ndarray  # (n, C) float
    attention: list[np.ndarray | None]  # per bag, (N,) weights over its instances


@dataclass
class SurvivalPredictions:
    """A survival model's output on a dataset; ``risk``: higher = earlier event (:func:`wsi_fl.mil.survival.risk`)."""

    slide_ids: list[str]
    time: np.ndarray  # (n,) float
    event: np.ndarray  # (n,) bool
    risk: np.ndarray  # (n,) float
    logits: np.ndarray | None = None  # (n, K) head outputs (discrete time: per-bin hazard logits)
    stratum: np.ndarray | None = None  # (n,) site index


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def class_weights(targets: np.ndarray, n_classes: int) -> torch.Tensor:
    """Inverse-frequency weights (n / (C * count)); a class absent from training gets weight 0."""
    counts = np.bincount(np.asarray(targets, dtype=np.int64), minlength=n_classes).astype(np.float64)
    weights = np.where(counts > 0, counts.sum() / (n_classes * np.maximum(counts, 1)), 0.0)
    return torch.tensor(weights, dtype=torch.float32)


def survival_of(ds: Dataset) -> tuple[np.ndarray, np.ndarray]:
    """``(times, events)`` of a survival bag dataset (also a Subset or a pooled ConcatDataset of them)."""
    times, events = getattr(ds, "times", None), getattr(ds, "events", None)
    if times is None and hasattr(ds, "dataset"):  # torch Subset
        t, e = survival_of(ds.dataset)  # type: ignore[attr-defined]
        idx = np.asarray(ds.indices)  # type: ignore[attr-defined]
        return t[idx], e[idx]
    if times is None or events is None:
        raise ConfigError("survival training needs bags with a time and an event (survival labels)")
    return np.asarray(times, dtype=np.float64), np.asarray(events, dtype=bool)


def survival_outputs(train_ds: Dataset, cfg: TrainConfig) -> tuple[int, np.ndarray | None]:
    """How many outputs a survival head needs (``MILConfig.n_classes``) and, for discrete time, the bin edges.

    Cox: 2 (``eta = logit_1 - logit_0``, :func:`~wsi_fl.mil.survival.log_risk`). Discrete: one hazard logit per
    bin, the bins from quantiles of the training event times (:func:`~wsi_fl.mil.survival.discrete_time_bins`).
    """
    if cfg.survival_loss == "cox":
        return 2, None
    edges = discrete_time_bins(*survival_of(train_ds), cfg.time_bins)
    return len(edges) - 1, edges


def _targets_of(ds: Dataset) -> np.ndarray:
    targets = getattr(ds, "targets", None)
    if targets is None:  # torch Subset of a bag dataset
        base, idx = ds.dataset, np.asarray(ds.indices)  # type: ignore[attr-defined]
        return np.asarray(base.targets)[idx]
    return np.asarray(targets)


def set_epoch(ds: Dataset, epoch: int) -> None:
    """Tell bag datasets (also inside a Subset or a pooled ConcatDataset) which epoch's subsample to draw."""
    if hasattr(ds, "set_epoch"):
        ds.set_epoch(epoch)
    for inner in getattr(ds, "datasets", ()):  # ConcatDataset
        set_epoch(inner, epoch)
    if hasattr(ds, "dataset"):  # Subset
        set_epoch(ds.dataset, epoch)


def auc_score(targets: np.ndarray, probs: np.ndarray) -> float:
    """ROC AUC (one-vs-rest macro for multi-class); NaN when only one class is present."""
    if len(np.unique(targets)) < 2:
        return math.nan
    if probs.shape[1] == 2:
        return float(roc_auc_score(targets, probs[:, 1]))
    return float(roc_auc_score(targets, probs, multi_class="ovr", labels=list(range(probs.shape[1]))))


@torch.inference_mode()
def predict(model: MILModel, ds: Dataset, *, batch_size: int = 1, device: str | torch.device = "cpu",
            keep_attention: bool = False) -> Predictions:
    device = torch.device(device)
    model.eval().to(device)
    loader = DataLoader(ds, batch_size=batch_size, shuffle=False, collate_fn=collate_bags)
    ids, targets, probs, attention = [], [], [], []
    for batch in loader:
        out = model(batch.x.to(device), batch.mask.to(device))
        probs.append(torch.softmax(out.logits.float(), dim=1).cpu().numpy())
        targets.append(batch.targets.numpy())
        ids.extend(batch.slide_ids)
        for b in range(len(batch.slide_ids)):
            if keep_attention and out.attention is not None:
                n = int(batch.mask[b].sum())
                attention.append(out.attention[b, :n].float().cpu().numpy())
            else:
                attention.append(None)
    n_classes = model.config.n_classes
    return Predictions(
        slide_ids=ids,
        targets=np.concatenate(targets) if targets else np.zeros(0, np.int64),
        probs=np.concatenate(probs) if probs else np.zeros((0, n_classes)),
        attention=attention,
    )


@torch.inference_mode()
def predict_risk(model: MILModel, ds: Dataset, cfg_or_bins: TrainConfig | str | np.ndarray | None = None, *,
                 batch_size: int = 1, device: str | torch.device = "cpu") -> SurvivalPredictions:
    """Risk scores of a survival model: ``cfg_or_bins`` says what its outputs are, a TrainConfig (its
    ``survival_loss``), ``"cox"``/``"discrete"``, or the bin edges (discrete time); None means Cox."""
    if isinstance(cfg_or_bins, TrainConfig):
        kind = cfg_or_bins.survival_loss
    elif isinstance(cfg_or_bins, str):
        kind = cfg_or_bins
    else:
        kind = "cox" if cfg_or_bins is None else "discrete"
    device = torch.device(device)
    model.eval().to(device)
    loader = DataLoader(ds, batch_size=batch_size, shuffle=False, collate_fn=collate_bags)
    ids, times, events, risks, logits, strata = [], [], [], [], [], []
    for batch in loader:
        if batch.time is None:
            raise ConfigError("predict_risk needs survival bags (with a time and an event)")
        out = model(batch.x.to(device), batch.mask.to(device)).logits.float().cpu()
        risks.append(risk(out, kind).numpy())
        logits.append(out.numpy())
        times.append(batch.time.numpy())
        events.append(batch.event.numpy())
        strata.append(batch.stratum.numpy())
        ids.extend(batch.slide_ids)
    if not ids:
        raise ConfigError("predict_risk: no bags")
    return SurvivalPredictions(ids, np.concatenate(times), np.concatenate(events).astype(bool),
                               np.concatenate(risks).astype(np.float64), np.concatenate(logits),
                               np.concatenate(strata))


class SurvivalLoss(torch.nn.Module):
    """A survival loss on a batch: Cox (risk sets within the batch and within each stratum = site) or discrete
    time (the batch's times binned by ``edges``). Called as ``criterion(logits, batch)``.

    Cox training adds ``centring`` x the batch's squared mean log-risk (:data:`COX_CENTRING`; 0: the partial
    likelihood alone), which holds the scores' level without changing any ranking.
    """

    def __init__(self, kind: str, edges: np.ndarray | None = None, centring: float = COX_CENTRING) -> None:
        super().__init__()
        if kind == "discrete" and edges is None:
            raise ValueError("the discrete-time loss needs bin edges")
        self.kind, self.edges, self.centring = kind, edges, centring

    def forward(self, logits: torch.Tensor, batch: BagBatch) -> torch.Tensor:
        event = batch.event.to(logits.device)
        if self.kind == "cox":
            eta = log_risk(logits)
            loss = cox_loss(eta, batch.time.to(logits.device), event, batch.stratum.to(logits.device))
            return loss + self.centring * eta.mean() ** 2 if self.centring else loss
        return discrete_time_loss(logits, time_bins(batch.time, self.edges).to(logits.device), event)

    def on_predictions(self, preds: SurvivalPredictions) -> float:
        """The loss over a whole (validation) set: its every slide in one risk set per site."""
        logits = torch.as_tensor(preds.logits, dtype=torch.float64)
        event = torch.as_tensor(preds.event)
        if self.kind == "cox":
            return float(cox_loss(log_risk(logits), torch.as_tensor(preds.time), event,
                                  torch.as_tensor(preds.stratum)))
        return float(discrete_time_loss(logits, time_bins(preds.time, self.edges), event))


def _loss_on(model: MILModel, preds: Predictions, weight: torch.Tensor | None) -> float:
    probs = torch.as_tensor(preds.probs, dtype=torch.float64).clamp_min(1e-12)
    nll = torch.nn.functional.nll_loss(probs.log(), torch.as_tensor(preds.targets),
                                       weight=None if weight is None else weight.double())
    return float(nll)


def make_optimizer(model: MILModel, cfg: TrainConfig) -> torch.optim.Optimizer:
    opt_cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    return opt_cls(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)


class BagCrossEntropy(torch.nn.CrossEntropyLoss):
    """Class-weighted cross-entropy averaged over the bags of a batch.

    ``CrossEntropyLoss(weight=w)`` with mean reduction divides by the sum of the
    batch's weights, so with one bag per step (the usual MIL batch) the weight
    cancels and class weighting silently does nothing. Dividing by the number
    of bags instead makes every bag of class ``c`` count ``w_c`` times.
    """

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(input, target, weight=self.weight, reduction="sum") / target.numel()


def make_criterion(train_ds: Dataset, n_classes: int, cfg: TrainConfig, device: torch.device) -> torch.nn.Module:
    weight = class_weights(_targets_of(train_ds), n_classes).to(device) if cfg.class_weighting else None
    return BagCrossEntropy(weight=weight)


def make_loader(train_ds: Dataset, cfg: TrainConfig) -> DataLoader:
    generator = torch.Generator().manual_seed(cfg.seed)
    return DataLoader(train_ds, batch_size=cfg.batch_size, shuffle=True, collate_fn=collate_bags,
                      generator=generator)


def train_epoch(model: MILModel, loader: DataLoader, optimizer: torch.optim.Optimizer,
                criterion: torch.nn.Module, device: torch.device, *, epoch: int,
                proximal_mu: float = 0.0, anchor: Sequence[torch.Tensor] | None = None) -> float:
    """One pass over ``loader``; returns the mean training loss per bag (without the proximal term).

    With ``proximal_mu > 0``, FedProx's ``mu/2 * ||w - w_global||^2`` (``anchor``
    = the global weights this round started from) is added to every step's loss,
    which keeps a site's local optimum from drifting far from the federation's.
    """
    set_epoch(loader.dataset, epoch)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    total, n_bags = 0.0, 0
    survival = isinstance(criterion, SurvivalLoss)
    for batch in loader:
        x, mask, y = batch.x.to(device), batch.mask.to(device), batch.targets.to(device)
        out = model(x, mask, labels=None if survival else y)  # no class label, so no instance (CLAM) loss
        loss = criterion(out.logits, batch) if survival else criterion(out.logits, y)
        if out.aux_loss is not None:
            loss = loss + out.aux_loss
        total += loss.item() * len(y)
        n_bags += len(y)
        if proximal_mu > 0 and anchor is not None:
            loss = loss + proximal_mu / 2 * sum(((p - a) ** 2).sum() for p, a in zip(params, anchor, strict=True))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return total / max(n_bags, 1)


def train_model(model: MILModel, train_ds: Dataset, val_ds: Dataset | None, cfg: TrainConfig,
                *, progress: bool = False) -> TrainResult:
    """Train with early stopping on the validation set (if given) and return the best epoch's weights.

    ``cfg.task == "survival"``: the bags carry times and events; the model's outputs must be
    :func:`survival_outputs`'s (2 for Cox, one per time bin for discrete time, the bins returned in the result),
    and the epoch is selected on the validation C-index (``early_stopping`` auc/cindex) or survival loss.
    """
    seed_everything(cfg.seed)
    device = pick_device(cfg.device)
    model.to(device)
    edges = None
    if cfg.task == "survival":
        n_out, edges = survival_outputs(train_ds, cfg)
        if model.config.n_classes != n_out:
            raise ConfigError(f"a {cfg.survival_loss} survival model needs {n_out} outputs (n_classes), "
                              f"not {model.config.n_classes}")
        criterion: torch.nn.Module = SurvivalLoss(cfg.survival_loss, edges)
    else:
        criterion = make_criterion(train_ds, model.config.n_classes, cfg, device)
    weight = getattr(criterion, "weight", None)
    optimizer = make_optimizer(model, cfg)
    loader = make_loader(train_ds, cfg)
    use_val = val_ds is not None and len(val_ds) > 0 and cfg.early_stopping != "none"
    best_state, best_epoch, best_score, stale = None, -1, -math.inf, 0
    history: list[dict[str, float]] = []
    epochs = range(cfg.epochs)
    if progress:
        from tqdm.auto import tqdm

        epochs = tqdm(epochs, desc="epochs", unit="epoch", leave=False)
    for epoch in epochs:
        record = {"epoch": epoch, "train_loss": train_epoch(model, loader, optimizer, criterion, device, epoch=epoch)}
        if use_val and isinstance(criterion, SurvivalLoss):
            spreds = predict_risk(model, val_ds, cfg.survival_loss, batch_size=cfg.batch_size, device=device)
            record["val_loss"] = criterion.on_predictions(spreds)
            record["val_c_index"] = _harrell(spreds)
            score = record["val_c_index"] if cfg.early_stopping in ("auc", "cindex") else -record["val_loss"]
            if math.isnan(score):  # no comparable pair in the validation set
                score = -record["val_loss"]
            if score > best_score:
                best_state, best_epoch, best_score, stale = copy.deepcopy(model.state_dict()), epoch, score, 0
            else:
                stale += 1
        elif use_val:
            preds = predict(model, val_ds, batch_size=cfg.batch_size, device=device)
            record["val_loss"] = _loss_on(model, preds, None if weight is None else weight.cpu())
            record["val_auc"] = auc_score(preds.targets, preds.probs)
            score = record["val_auc"] if cfg.early_stopping in ("auc", "cindex") else -record["val_loss"]
            if math.isnan(score):  # AUC undefined on a one-class validation set: fall back to the loss
                score = -record["val_loss"]
            if score > best_score:
                best_state, best_epoch, best_score, stale = copy.deepcopy(model.state_dict()), epoch, score, 0
            else:
                stale += 1
        history.append(record)
        if use_val and stale >= cfg.patience:
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    else:
        best_epoch = len(history) - 1
    return TrainResult(model=model.eval(), best_epoch=best_epoch, history=history, bin_edges=edges)


def _harrell(preds: SurvivalPredictions) -> float:
    from wsi_fl.evaluation.survival import harrell_c  # scikit-survival: imported on use

    return harrell_c(preds.time, preds.event, preds.risk)


def concat_datasets(datasets: Sequence[Dataset]) -> Dataset:
    """Pool several sites' bag datasets (keeps ``targets`` for class weighting and splitting)."""
    pooled = torch.utils.data.ConcatDataset(datasets)
    pooled.targets = np.concatenate([_targets_of(d) for d in datasets])  # type: ignore[attr-defined]
    if all(hasattr(d, "times") for d in datasets):  # survival bags: times, events and site strata too
        for key in ("times", "events", "strata"):
            setattr(pooled, key, np.concatenate([getattr(d, key) for d in datasets]))
    return pooled
