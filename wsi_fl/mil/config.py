"""The settings of local and pooled training, standard library only.

Kept apart from :mod:`wsi_fl.mil.training` (which imports torch) so that the
CLI can turn these dataclasses into ``wsi-fl train`` options, defaults and all,
without importing torch: ``--help`` stays instant and every default is written
once, here. Each field's ``metadata["help"]`` becomes the option's help text
(``wsi_fl.cli._args.add_dataclass_args``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Literal, get_args

from wsi_fl.errors import ConfigError

Optimizer = Literal["adam", "adamw"]
EarlyStopping = Literal["auc", "cindex", "loss", "none"]
Task = Literal["classification", "survival"]
SurvivalLoss = Literal["cox", "discrete"]


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings; one default for every dataset (no per-dataset tuning)."""

    epochs: int = field(default=40, metadata={"help": "maximum number of epochs"})
    lr: float = field(default=2e-4, metadata={"help": "learning rate"})
    weight_decay: float = field(default=1e-4, metadata={"help": "weight decay (decoupled for adamw)"})
    optimizer: Optimizer = field(default="adamw", metadata={"help": "adam or adamw"})
    class_weighting: bool = field(default=True, metadata={"help": "weight the loss by inverse class frequency"})
    early_stopping: EarlyStopping = field(
        default="loss", metadata={"help": "validation metric that selects the best epoch: auc, cindex, loss or none "
                                          "(for survival, auc and cindex both mean Harrell's C-index)"}
    )
    patience: int = field(default=10, metadata={"help": "epochs without improvement before stopping"})
    max_instances: int | None = field(
        default=None, metadata={"help": "train on at most this many instances per bag, redrawn every epoch"}
    )
    batch_size: int = field(default=1, metadata={"help": "bags per optimisation step (padded and masked)"})
    seed: int = field(default=0, metadata={"help": "random seed (weights, shuffling, subsampling)"})
    device: str = field(default="auto", metadata={"help": "auto, cpu or cuda"})
    task: Task = field(default="classification", metadata={"help": "classification (slide labels) or survival "
                                                                   "(time-to-event labels)"})
    survival_loss: SurvivalLoss = field(
        default="cox", metadata={"help": "survival: cox (partial likelihood, risk sets within a batch and site; "
                                         "needs --batch-size >= 2) or discrete (per-bin hazards, DP-SGD compatible)"})
    time_bins: int = field(default=4, metadata={"help": "survival, discrete: number of time bins (quantiles of "
                                                        "the training event times)"})

    def __post_init__(self) -> None:
        # Checked here so that "--epochs 0" fails before any data is read, naming the option.
        for name in ("epochs", "patience", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"TrainConfig.{name} must be >= 1, not {getattr(self, name)}")
        if self.max_instances is not None and self.max_instances < 1:
            raise ConfigError(f"TrainConfig.max_instances must be >= 1 or None, not {self.max_instances}")
        if not self.lr > 0 or self.weight_decay < 0:
            raise ConfigError(f"TrainConfig needs lr > 0 and weight_decay >= 0, not {self.lr}, {self.weight_decay}")
        for name, kind in (("optimizer", Optimizer), ("early_stopping", EarlyStopping), ("task", Task),
                           ("survival_loss", SurvivalLoss)):
            if getattr(self, name) not in get_args(kind):
                raise ConfigError(f"TrainConfig.{name} must be one of {', '.join(get_args(kind))}, "
                                  f"not {getattr(self, name)!r}")
        if self.task == "survival" and self.survival_loss == "discrete" and self.time_bins < 2:
            raise ConfigError(f"TrainConfig.time_bins must be >= 2 for discrete-time survival, not {self.time_bins}")
        if self.task == "survival" and self.survival_loss == "cox" and self.batch_size < 2:
            # A risk set of one slide has a partial likelihood of exactly 1: nothing would be learnt.
            raise ConfigError("Cox survival training forms risk sets within a batch: give --batch-size >= 2 "
                              f"(e.g. 32), not {self.batch_size}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class SplitConfig:
    """How a site's slides are split into train/validation/test, by patient, when its labels have no split column."""

    label_col: str = field(default="label", metadata={"help": "outcome column of the labels files"})
    time_col: str = field(default="time", metadata={"help": "survival: time-to-event column of the labels files"})
    event_col: str = field(default="event", metadata={"help": "survival: event column (1 event, 0 censored)"})
    val_frac: float = field(default=0.15, metadata={"help": "validation share of patients (0: no epoch selection)"})
    test_frac: float = field(default=0.2, metadata={"help": "test share of patients (0: no test split)"})

    def __post_init__(self) -> None:
        if not (0 <= self.val_frac < 1 and 0 <= self.test_frac < 1 and self.val_frac + self.test_frac < 1):
            raise ConfigError(f"need 0 <= val_frac, test_frac and val_frac + test_frac < 1, "
                              f"not {self.val_frac}, {self.test_frac}")


#: How every trainer in this project splits a site: the labels' ``split`` column when every row has one, else
#: a patient-level split stratified by label, drawn per site (wsi_fl.mil.fit.assign_splits). A checkpoint names
#: the rule, so that a later version that splits otherwise cannot be mistaken for this one.
SPLIT_RULE = "per-site patient-level stratified v1"


@dataclass(frozen=True)
class SplitRecord:
    """How a model's training slides were split, stored in its checkpoint (``meta["splits"]``).

    Enough for ``wsi-fl evaluate`` to recompute, from a site's own labels file, which of its slides were held
    out (the site's split depends only on its labels and these values), and nothing that names a slide: a
    federated checkpoint leaves the server, and the server never learns a slide id. ``sites`` (local and pooled
    training only) holds each training site's name and a digest of its labels, so that evaluate can say whether
    the labels it is given are a training site's, unchanged.
    """

    seed: int
    val_frac: float
    test_frac: float
    label_col: str
    rule: str = SPLIT_RULE
    sites: tuple[dict, ...] = ()

    def to_meta(self) -> dict:
        return {"rule": self.rule, "seed": self.seed, "val_frac": self.val_frac, "test_frac": self.test_frac,
                "label_col": self.label_col, "sites": [dict(s) for s in self.sites]}

    @classmethod
    def from_meta(cls, meta: dict) -> SplitRecord | None:
        """The record in a checkpoint's meta; None for a checkpoint made before records (or without one)."""
        record = meta.get("splits")
        if not isinstance(record, dict):
            return None
        try:
            return cls(seed=int(record["seed"]), val_frac=float(record["val_frac"]),
                       test_frac=float(record["test_frac"]), label_col=str(record["label_col"]),
                       rule=str(record["rule"]), sites=tuple(dict(s) for s in record.get("sites", ())))
        except (KeyError, TypeError, ValueError) as err:
            raise ConfigError(f"the checkpoint's split record is damaged ({err})") from err

    def describe(self) -> str:
        return (f"seed {self.seed}, val-frac {self.val_frac:g}, test-frac {self.test_frac:g}, by patient, "
                f"label column {self.label_col!r}")
