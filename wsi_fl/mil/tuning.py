"""Nested cross-validation: pick training settings on inner folds of the training bags, never on test bags.

Why nested: choosing a learning rate or an epoch count by its score on the test folds reports the best of
several tries as if it were one, an optimistic bias that grows with the grid. Here the choice is made on
``inner_folds`` patient-level folds *of the training bags only*; the outer test fold is scored once, by the
model refit on all its training bags with the chosen settings. :func:`tune` only ever receives the training
set's targets and groups and a ``make_sets`` callback that it calls with indices into that training set, so
it cannot reach a test bag (tests/mil/test_tuning.py checks this).

The grid (:class:`TuneGrid`) is deliberately small, since every point costs ``inner_folds`` trainings:

* ``lr`` 1e-4 or 5e-4 (AdamW): the protocol's 5e-4 and a slower one for the noisier tables (Fox);
* ``weight_decay`` 1e-4 or 1e-2: light or strong shrinkage of ~80 to 180 training bags;
* ``hidden_dim`` 64 or 512 (``attn_dim`` = half of it): Ilse et al.'s narrow MIL-benchmark embedding or this
  project's slide default;
* ``epochs`` 10, 20 or 40: read off one 40-epoch run per grid point (with a constant learning rate the
  model after epoch 10 of that run *is* a 10-epoch model), so epochs cost nothing extra.

8 trainings x 3 inner folds per outer fold, each on two thirds of the training bags: 16 untuned trainings'
worth of steps (measured: 12 times the untuned CPU time on a Musk1 outer fold, 100 against 8.2 CPU-s).
Selection: the highest mean inner-validation accuracy (survival: Harrell's C), ties broken by the lower mean
validation loss, then by grid order (the first listed wins).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import torch
from torch.utils.data import Dataset

from models import MILConfig, create_model
from wsi_fl.errors import ConfigError
from wsi_fl.mil.config import TrainConfig
from wsi_fl.mil.splits import patient_kfold
from wsi_fl.mil.training import (
    SurvivalLoss,
    make_criterion,
    make_loader,
    make_optimizer,
    pick_device,
    predict,
    predict_risk,
    seed_everything,
    survival_outputs,
    train_epoch,
)

#: ``make_sets(inner_train_idx, inner_val_idx) -> (train_ds, val_ds)``, indices into the *training* set.
MakeSets = Callable[[np.ndarray, np.ndarray], tuple[Dataset, Dataset]]


@dataclass(frozen=True)
class TuneGrid:
    """The settings nested CV chooses among (see the module docstring for why these values)."""

    lr: tuple[float, ...] = (1e-4, 5e-4)
    weight_decay: tuple[float, ...] = (1e-4, 1e-2)
    hidden_dim: tuple[int, ...] = (64, 512)
    epochs: tuple[int, ...] = (10, 20, 40)
    inner_folds: int = 3

    def __post_init__(self) -> None:
        for name in ("lr", "weight_decay", "hidden_dim", "epochs"):
            if not getattr(self, name):
                raise ConfigError(f"TuneGrid.{name} must list at least one value")
        if min(self.epochs) < 1 or min(self.hidden_dim) < 2 or min(self.lr) <= 0 or min(self.weight_decay) < 0:
            raise ConfigError(f"TuneGrid values out of range: {self}")
        if self.inner_folds < 2:
            raise ConfigError(f"TuneGrid.inner_folds must be >= 2, not {self.inner_folds}")

    def points(self) -> list[dict]:
        """Every (lr, weight_decay, hidden_dim) combination, in grid order; epochs are read off each run."""
        return [{"lr": lr, "weight_decay": wd, "hidden_dim": h}
                for lr, wd, h in itertools.product(self.lr, self.weight_decay, self.hidden_dim)]

    def to_dict(self) -> dict:
        return asdict(self)


#: The documented grid (module docstring).
DEFAULT_GRID = TuneGrid()


@dataclass
class TuneResult:
    """The chosen settings and every grid point's inner-CV score (for the report)."""

    best: dict  # lr, weight_decay, hidden_dim, epochs
    score: float  # its mean inner-validation accuracy (or C-index)
    table: list[dict] = field(default_factory=list)

    def apply(self, model: MILConfig, train: TrainConfig) -> tuple[MILConfig, TrainConfig]:
        """``model`` and ``train`` with the chosen settings (``attn_dim`` = half the chosen width)."""
        h = int(self.best["hidden_dim"])
        return (replace(model, hidden_dim=h, attn_dim=max(h // 2, 1)),
                replace(train, lr=float(self.best["lr"]), weight_decay=float(self.best["weight_decay"]),
                        epochs=int(self.best["epochs"])))


def _scores(model, val_ds: Dataset, criterion: torch.nn.Module, survival: bool, kind: str) -> tuple[float, float]:
    """(score, loss) on the inner validation bags: accuracy and cross-entropy, or Harrell's C and survival loss."""
    if survival:
        from wsi_fl.evaluation.survival import harrell_c

        preds = predict_risk(model, val_ds, kind)
        return harrell_c(preds.time, preds.event, preds.risk), criterion.on_predictions(preds)
    preds = predict(model, val_ds)
    probs = np.clip(preds.probs, 1e-12, 1.0)
    loss = float(-np.log(probs[np.arange(len(preds.targets)), preds.targets]).mean())
    return float((preds.probs.argmax(1) == preds.targets).mean()), loss


def evaluate_point(model_cfg: MILConfig, train_cfg: TrainConfig, train_ds: Dataset, val_ds: Dataset,
                   epochs: tuple[int, ...]) -> dict[int, tuple[float, float]]:
    """Train one model for ``max(epochs)`` epochs; ``{epoch: (score, loss)}`` on ``val_ds`` after each listed one."""
    seed_everything(train_cfg.seed)
    device = pick_device(train_cfg.device)
    survival = train_cfg.task == "survival"
    if survival:
        n_out, edges = survival_outputs(train_ds, train_cfg)
        model_cfg = replace(model_cfg, n_classes=n_out)
        criterion: torch.nn.Module = SurvivalLoss(train_cfg.survival_loss, edges)
    else:
        criterion = make_criterion(train_ds, model_cfg.n_classes, train_cfg, device)
    torch.manual_seed(train_cfg.seed)
    model = create_model(model_cfg).to(device)
    optimizer = make_optimizer(model, train_cfg)
    loader = make_loader(train_ds, train_cfg)
    kind = edges if survival and train_cfg.survival_loss == "discrete" else "cox"
    out: dict[int, tuple[float, float]] = {}
    for epoch in range(max(epochs)):
        train_epoch(model, loader, optimizer, criterion, device, epoch=epoch)
        if epoch + 1 in epochs:
            out[epoch + 1] = _scores(model, val_ds, criterion, survival, kind)
    return out


def tune(targets: np.ndarray, groups: np.ndarray, make_sets: MakeSets, model_cfg: MILConfig,
         train_cfg: TrainConfig, grid: TuneGrid | None = None, seed: int = 0) -> TuneResult:
    """Choose a grid point by ``grid.inner_folds``-fold patient-level CV over the *training* set.

    ``targets``/``groups`` describe the training bags only (stratification and patients), and
    ``make_sets`` builds an inner (train, validation) pair from indices into them: whatever standardisation
    it does must use the inner training bags only. Returns the chosen settings with every point's scores.
    """
    grid = grid_or_default(grid)
    targets, groups = np.asarray(targets), np.asarray(groups)
    inner = patient_kfold(targets, groups, grid.inner_folds, seed)
    points = grid.points()
    # scores[p][epoch] = list over inner folds of (score, loss)
    scores: list[dict[int, list[tuple[float, float]]]] = [{e: [] for e in grid.epochs} for _ in points]
    for k, (tr, va) in enumerate(inner):
        train_ds, val_ds = make_sets(tr, va)
        for p, point in enumerate(points):
            cfg = replace(train_cfg, lr=point["lr"], weight_decay=point["weight_decay"],
                          epochs=max(grid.epochs), seed=seed + 7919 * k)
            h = point["hidden_dim"]
            for e, pair in evaluate_point(replace(model_cfg, hidden_dim=h, attn_dim=max(h // 2, 1)), cfg,
                                          train_ds, val_ds, grid.epochs).items():
                scores[p][e].append(pair)
    table = []
    for point, per_epoch in zip(points, scores, strict=True):
        for e in grid.epochs:
            s = [v for v, _ in per_epoch[e] if not math.isnan(v)]
            table.append({**point, "epochs": e, "score": float(np.mean(s)) if s else math.nan,
                          "loss": float(np.mean([loss for _, loss in per_epoch[e]]))})
    ranked = sorted(range(len(table)), key=lambda i: (-_finite(table[i]["score"]), table[i]["loss"], i))
    best = table[ranked[0]]
    return TuneResult(best={k: best[k] for k in ("lr", "weight_decay", "hidden_dim", "epochs")},
                      score=best["score"], table=table)


def _finite(x: float) -> float:
    return -math.inf if math.isnan(x) else x


def tune_for_fit(sites, model: MILConfig, train: TrainConfig, *, label_col: str = "label", val_frac: float = 0.15,
                 test_frac: float = 0.2, time_col: str = "time", event_col: str = "event",
                 grid: TuneGrid | None = None) -> tuple[MILConfig, TrainConfig, TuneResult]:
    """``wsi-fl train --tune``: nested CV over the patients of the *training* split that
    :func:`wsi_fl.mil.fit.fit` will draw (same sites, fractions and seed), never its validation or test slides.

    Returns ``model`` and ``train`` with the chosen settings, for ``fit`` to refit on the training split (with
    the user's early stopping, if any, up to the chosen number of epochs), and the scores of every grid point.
    """
    from wsi_fl.mil.fit import assign_site_splits, build_dataset, load_site_records, load_site_survival_records

    survival = train.task == "survival"
    if survival:
        pairs, n_classes = load_site_survival_records(sites, time_col, event_col), 2
    else:
        pairs, classes = load_site_records(sites, label_col)
        n_classes = len(classes)
    idx = assign_site_splits(pairs, val_frac, test_frac, train.seed)["train"]
    targets = np.array([pairs[int(i)][1].target for i in idx])
    groups = np.array([pairs[int(i)][1].patient_id for i in idx])
    if np.unique(groups).size < 2 * grid_or_default(grid).inner_folds:
        raise ConfigError(f"--tune needs at least {2 * grid_or_default(grid).inner_folds} training patients for "
                          f"{grid_or_default(grid).inner_folds} inner folds, the training split has "
                          f"{np.unique(groups).size}")

    def make_sets(a: np.ndarray, b: np.ndarray) -> tuple[Dataset, Dataset]:
        return (build_dataset(pairs, idx[a], max_instances=train.max_instances, seed=train.seed),
                build_dataset(pairs, idx[b], max_instances=None, seed=train.seed))

    probe = build_dataset(pairs, idx[:1], max_instances=None, seed=train.seed)
    template = replace(model, in_dim=int(probe.feature_dim), n_classes=n_classes)
    result = tune(targets, groups, make_sets, template, replace(train, early_stopping="none"), grid, train.seed)
    tuned_model, tuned_train = result.apply(model, train)
    return tuned_model, tuned_train, result


def grid_or_default(grid: TuneGrid | None) -> TuneGrid:
    return grid or DEFAULT_GRID
