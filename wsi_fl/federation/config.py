"""Every tunable of a federated run, in one frozen dataclass that mirrors ``[tool.flwr.app.config]``.

Flower hands the ServerApp a flat ``run_config`` with hyphenated keys (from
``pyproject.toml``, overridden by ``flwr run --run-config``). Parsing it into a
typed dataclass here means a typo (``local-epoch``) or a wrong type is a
one-line error at start-up rather than a default silently used, and the
Python API (``wsi_fl.engines.simulation``) and the CLI take the same object. A test
checks that ``pyproject.toml`` lists exactly these keys with these defaults.

What a site needs to train (epochs, learning rate, split fractions, model) is
sent to it in every instruction; a ClientApp holds no training settings of its
own, only where its data is (its node config).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, get_args, get_origin, get_type_hints

from models.config import MILConfig
from wsi_fl.errors import ConfigError
from wsi_fl.mil.config import Optimizer, SplitConfig, TrainConfig

StrategyName = Literal["fedavg", "fedprox", "fedadam", "fedyogi", "fedmedian", "fedtrimmedavg"]
Transport = Literal["float32", "float16"]
InputNorm = Literal["none", "slide"]  # models.config.INPUT_NORMS
DPMode = Literal["none", "client-fixed", "client-adaptive", "server-fixed", "server-adaptive", "slide-dpsgd"]

#: Central DP modes: the server adds the noise to the mean of the sites' clipped updates (a site is the unit,
#: wsi_fl.privacy.central). "slide-dpsgd" is local instead: each site runs DP-SGD, a slide is the unit
#: (wsi_fl.privacy.dpsgd).
CENTRAL_DP = ("client-fixed", "client-adaptive", "server-fixed", "server-adaptive")

#: Strategies whose aggregate is the plain mean of the sites' models, so noise calibrated to the mean's sensitivity
#: makes it private (FedAdam/FedYogi keep moments of the un-noised mean; FedMedian/FedTrimmedAvg have another
#: sensitivity).
DP_STRATEGIES = ("fedavg", "fedprox")

#: Strategies whose round ends at the sites' weighted mean, which ``server-step`` can scale (wsi_fl.server.strategies).
STEP_STRATEGIES = ("fedavg", "fedprox")
SelectOn = Literal["val-auc", "val-c-index", "val-loss", "last"]
Task = Literal["classification", "survival"]
SurvivalLoss = Literal["cox", "discrete"]
#: A Cox batch needs several patients (a risk set of one has no information): the batch size "auto" (0) gives.
COX_BATCH = 32

_SPLIT = SplitConfig()  # the split defaults of local and pooled training, so a federation splits the same way

#: The MILConfig fields a federation chooses, under the same names here (in_dim and n_classes come from the sites'
#: data; CLAM's k_sample and inst_weight keep their defaults). One list, so a field added later reaches what the sites
#: are sent (CLIENT_KEYS), what a resumed run must keep (wsi_fl.server) and a script that turns a MILConfig
#: into a FedConfig (scripts/bench_federated.py); input-norm was once missing from the resume keys.
MODEL_FIELDS = ("model", "hidden_dim", "attn_dim", "dropout", "input_norm")
#: The same as run-config keys: what the server sends the sites, and what a resumed run must keep.
MODEL_KEYS = tuple(name.replace("_", "-") for name in MODEL_FIELDS)

#: FedConfig keys the server (wsi_fl.server) sends to sites with every instruction (the rest concern the server only).
CLIENT_KEYS = ("local-epochs", *MODEL_KEYS, "optimizer", "lr", "weight-decay", "class-weighting", "max-instances",
               "label-col", "val-frac", "test-frac", "seed", "transport", "auc-bins", "num-server-rounds", "strategy",
               "dp", "dp-noise-multiplier", "dp-clipping-norm", "dp-epsilon", "dp-delta", "dp-batch-size", "secagg",
               # survival: what the sites train and the grid their histograms are counted on (SURVIVAL_KEYS)
               "task", "survival-loss", "time-bins", "time-col", "event-col", "batch-size", "hist-time-min",
               "hist-time-max", "hist-time-bins", "hist-risk-min", "hist-risk-max", "hist-risk-bins")
#: Keys the SecAgg+ driver (wsi_fl.server.secagg) adds to an instruction for the site's adapter (wsi_fl.site.secagg).
SECAGG_KEY_NAMES, SECAGG_KEY_CLIP, SECAGG_KEY_MAX_WEIGHT = ("secagg-array-names", "secagg-clipping-range",
                                                          "secagg-max-weight")


@dataclass(frozen=True)
class FedConfig:
    # Rounds and sampling
    num_server_rounds: int = field(default=30, metadata={"help": "federated rounds"})
    local_epochs: int = field(default=1, metadata={"help": "epochs each site trains per round"})
    strategy: StrategyName = field(default="fedavg", metadata={"help": "aggregation strategy"})
    fraction_train: float = field(default=1.0, metadata={"help": "fraction of connected sites trained per round"})
    min_train_nodes: int = field(default=2, metadata={"help": "fewest training replies a round aggregates"})
    fraction_evaluate: float = field(default=1.0, metadata={"help": "fraction of sites evaluating per round"})
    min_evaluate_nodes: int = field(default=2, metadata={"help": "sites sampled for evaluation (at least)"})
    min_available_nodes: int = field(default=2, metadata={"help": "sites that must be connected to start"})
    round_timeout: float = field(default=600.0, metadata={"help": "seconds to wait for a round's replies"})
    # Strategy parameters
    # 1, not 0.01: with Adam at the sites a term of 0.01 is far below the loss gradient and FedProx was FedAvg;
    # mu = 1 met every benchmark cell on seeds it was not chosen on (docs/federated-benchmark.md).
    proximal_mu: float = field(default=1.0, metadata={"help": "FedProx proximal weight mu"})
    server_step: float = field(default=1.0, metadata={"help": "FedAvg/FedProx: the server moves this many times "
                                                               "from the global model towards the sites' weighted "
                                                               "mean (1: plain FedAvg; 0: auto, the effective number "
                                                               "of sites 1/sum(w^2))"})
    server_lr: float = field(default=0.01, metadata={"help": "FedAdam/FedYogi server learning rate (eta)"})
    server_beta_1: float = field(default=0.9, metadata={"help": "FedAdam/FedYogi first-moment decay"})
    server_beta_2: float = field(default=0.99, metadata={"help": "FedAdam/FedYogi second-moment decay"})
    server_tau: float = field(default=1e-3, metadata={"help": "FedAdam/FedYogi adaptivity tau"})
    trim_beta: float = field(default=0.2, metadata={"help": "FedTrimmedAvg: fraction cut at each end"})
    # Privacy (see wsi_fl.privacy.central and the README's threat model)
    dp: DPMode = field(default="none", metadata={"help": "central DP (who clips the site updates, fixed or adaptive "
                                                         "norm) or slide-dpsgd (DP-SGD at each site, per slide)"})
    dp_epsilon: float = field(default=0.0, metadata={"help": "target epsilon over all rounds (0: dp-noise-multiplier)"})
    dp_delta: float = field(default=1e-5, metadata={"help": "delta of the (epsilon, delta) guarantee"})
    dp_noise_multiplier: float = field(default=0.0, metadata={"help": "Gaussian noise / clipping norm (dp-epsilon 0)"})
    dp_clipping_norm: float = field(default=1.0, metadata={"help": "L2 clipping norm of a site's update (initial if "
                                                                    "adaptive), or of a bag's gradient (slide-dpsgd)"})
    dp_batch_size: int = field(default=8, metadata={"help": "slide-dpsgd: expected bags per step (sampling rate = "
                                                           "this / a site's training bags)"})
    secagg: bool = field(default=False, metadata={"help": "SecAgg+: the server learns only the sum of updates"})
    secagg_clipping_range: float = field(default=8.0, metadata={"help": "SecAgg+: weights clipped to +-this"})
    secagg_quantization_range: int = field(default=4194304, metadata={"help": "SecAgg+: quantisation levels"})
    # Model (the MILConfig fields a federation chooses; in_dim and classes come from the sites)
    model: str = field(default="gated_attention", metadata={"help": "registered MIL model"})
    hidden_dim: int = field(default=512, metadata={"help": "instance embedding width"})
    attn_dim: int = field(default=256, metadata={"help": "attention MLP width"})
    dropout: float = field(default=0.25, metadata={"help": "dropout after the instance embedding"})
    input_norm: InputNorm = field(default="none", metadata={"help": "none, or slide: standardise each feature over the "
                                                               "slide's own tiles (small models, DP-SGD)"})
    # Local optimisation (sent to the sites)
    optimizer: Optimizer = field(default="adam", metadata={"help": "local optimizer"})
    lr: float = field(default=2e-4, metadata={"help": "local learning rate"})
    weight_decay: float = field(default=1e-4, metadata={"help": "local weight decay"})
    class_weighting: bool = field(default=True, metadata={"help": "inverse-frequency class weights (per site)"})
    max_instances: int = field(default=0, metadata={"help": "instances per bag per epoch (0: all)"})
    # Data (sent to the sites, so every site splits the same way)
    label_col: str = field(default=_SPLIT.label_col, metadata={"help": "outcome column of the labels CSV"})
    val_frac: float = field(default=_SPLIT.val_frac,
                            metadata={"help": "each site's validation fraction (by patient; 0: none)"})
    test_frac: float = field(default=_SPLIT.test_frac,
                             metadata={"help": "each site's held-out test fraction (by patient)"})
    seed: int = field(default=0, metadata={"help": "seed for weights, splits, sampling and shuffling"})
    # Survival (sent to the sites). The histogram grid is fixed here, before any data is seen: every site counts
    # its patients on the same edges, and neither its shape nor its range depends on a site's data.
    task: Task = field(default="classification", metadata={"help": "classification (label-col) or survival "
                                                                    "(time-col, event-col)"})
    survival_loss: SurvivalLoss = field(default="cox", metadata={
        "help": "survival: cox (partial likelihood, risk sets within a site's batch) or discrete (time-bins hazards)"})
    time_bins: int = field(default=8, metadata={"help": "discrete survival: hazard bins, equal width over "
                                                        "[hist-time-min, hist-time-max]"})
    time_col: str = field(default="time", metadata={"help": "survival: follow-up time column of the labels CSV"})
    event_col: str = field(default="event", metadata={"help": "survival: event column (1 event, 0 censored)"})
    batch_size: int = field(default=0, metadata={"help": "bags per local step (0: auto, 1; cox survival 32)"})
    hist_time_min: float = field(default=0.0, metadata={"help": "survival histograms: first time edge"})
    hist_time_max: float = field(default=0.0, metadata={"help": "survival histograms: last time edge, the longest "
                                                                "follow-up expected (required for survival)"})
    hist_time_bins: int = field(default=64, metadata={"help": "survival histograms: time bins"})
    hist_risk_min: float = field(default=0.0, metadata={"help": "survival histograms: first risk edge (min and max "
                                                                "0: auto, cox -5..5, discrete -time-bins..0)"})
    hist_risk_max: float = field(default=0.0, metadata={"help": "survival histograms: last risk edge"})
    hist_risk_bins: int = field(default=64, metadata={"help": "survival histograms: risk bins"})
    td_auc_time: float = field(default=0.0, metadata={"help": "survival: horizon of the time-dependent AUC, moved "
                                                              "to the nearest inner time edge (0: the pooled median "
                                                              "event time's)"})
    # Transport, evaluation, output
    transport: Transport = field(default="float32", metadata={"help": "dtype of updates sites send"})
    auc_bins: int = field(default=1000, metadata={"help": "score histogram bins for the federated AUC"})
    select_on: SelectOn = field(default="val-loss", metadata={"help": "federated metric picking the best model"})
    out_dir: str = field(default="fl-run", metadata={"help": "where the server writes checkpoints and metrics"})
    resume: bool = field(default=False, metadata={"help": "continue from the last completed round in out-dir"})

    def __post_init__(self) -> None:
        hints = get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            choices = get_args(hints[f.name]) if get_origin(hints[f.name]) is Literal else ()
            if f.type == "float" and isinstance(value, int) and not isinstance(value, bool):
                object.__setattr__(self, f.name, float(value))
            elif f.type in ("int", "float", "str", "bool") and not _is(value, f.type):
                raise ConfigError(f"run config {_key(f.name)} must be {f.type}, not {value!r}")
            elif choices and value not in choices:
                raise ConfigError(f"run config {_key(f.name)} must be one of {', '.join(choices)}, not {value!r}")
        for name in ("num_server_rounds", "local_epochs", "auc_bins"):
            if getattr(self, name) < 1:
                raise ConfigError(f"run config {_key(name)} must be >= 1, not {getattr(self, name)}")
        for name in ("fraction_train", "fraction_evaluate"):
            if not 0.0 < getattr(self, name) <= 1.0:
                raise ConfigError(f"run config {_key(name)} must be in (0, 1], not {getattr(self, name)}")
        if not 0.0 <= self.trim_beta < 0.5:
            raise ConfigError(f"run config trim-beta must be in [0, 0.5), not {self.trim_beta}")
        if not (0 <= self.val_frac < 1 and 0 <= self.test_frac < 1 and self.val_frac + self.test_frac < 1):
            raise ConfigError(f"run config needs 0 <= val-frac, test-frac and val-frac + test-frac < 1, "
                              f"not {self.val_frac}, {self.test_frac}")
        if self.proximal_mu < 0 or self.lr <= 0 or self.server_lr <= 0:
            raise ConfigError("run config proximal-mu must be >= 0 and lr, server-lr > 0")
        if self.server_step < 0:
            raise ConfigError(f"run config server-step must be >= 0 (0: auto), not {self.server_step}")
        if self.server_step != 1.0 and self.strategy not in STEP_STRATEGIES:
            raise ConfigError(f"run config server-step applies to {' and '.join(STEP_STRATEGIES)} only; "
                              f"{self.strategy!r} takes its own server step (server-lr) or none")
        if self.server_step != 1.0 and self.dp in CENTRAL_DP:
            raise ConfigError(f"run config server-step must be 1 with dp = {self.dp!r}: the noise is calibrated to "
                              "the mean of the clipped updates, and a larger step would scale its sensitivity")
        if self.server_step == 0.0 and self.secagg:
            raise ConfigError("run config server-step = 0 (auto) weighs the sites' replies, but under SecAgg+ the "
                              "strategy gets their sum as one update; give a number instead")
        if self.dp != "none" and not (self.dp_epsilon > 0 or self.dp_noise_multiplier > 0):
            raise ConfigError(f"run config dp = {self.dp!r} needs dp-epsilon > 0 or dp-noise-multiplier > 0")
        if self.dp in CENTRAL_DP and self.strategy not in DP_STRATEGIES:
            raise ConfigError(f"run config dp = {self.dp!r} needs strategy {' or '.join(DP_STRATEGIES)}, "
                              f"not {self.strategy!r}")
        if self.dp_epsilon < 0 or self.dp_noise_multiplier < 0 or self.dp_clipping_norm <= 0:
            raise ConfigError("run config dp-epsilon, dp-noise-multiplier must be >= 0 and dp-clipping-norm > 0")
        if self.dp_batch_size < 1:
            raise ConfigError(f"run config dp-batch-size must be >= 1, not {self.dp_batch_size}")
        if not 0 < self.dp_delta < 1:
            raise ConfigError(f"run config dp-delta must be in (0, 1), not {self.dp_delta}")
        self._check_survival()
        self.mil_config(1, 2)  # validates model fields with MILConfig's own messages

    def _check_survival(self) -> None:
        if self.batch_size < 0 or self.time_bins < 2 or self.hist_time_bins < 2 or self.hist_risk_bins < 2:
            raise ConfigError(f"run config needs batch-size >= 0 and time-bins, hist-time-bins, hist-risk-bins >= 2, "
                              f"not {self.batch_size}, {self.time_bins}, {self.hist_time_bins}, {self.hist_risk_bins}")
        if (self.select_on == "val-c-index") != (self.task == "survival") and self.select_on in ("val-auc",
                                                                                                   "val-c-index"):
            raise ConfigError(f"run config select-on = {self.select_on!r} does not apply to task = {self.task!r} "
                              "(classification: val-auc; survival: val-c-index; either: val-loss or last)")
        if self.task != "survival":
            return
        if not 0 <= self.hist_time_min < self.hist_time_max:
            raise ConfigError(f"run config task = 'survival' needs 0 <= hist-time-min < hist-time-max (the longest "
                              f"follow-up expected, agreed before any data is seen), not {self.hist_time_min}, "
                              f"{self.hist_time_max}")
        if (self.hist_risk_min, self.hist_risk_max) != (0.0, 0.0) and not self.hist_risk_min < self.hist_risk_max:
            raise ConfigError(f"run config needs hist-risk-min < hist-risk-max (or both 0: auto), not "
                              f"{self.hist_risk_min}, {self.hist_risk_max}")
        from wsi_fl.mil.survival import check_dp_compatible  # one rule for local and federated training

        check_dp_compatible(self.survival_loss, self.dp == "slide-dpsgd")

    def effective_batch_size(self) -> int:
        """``batch-size``, or for 0 (auto) 1 bag per step, and :data:`COX_BATCH` for Cox survival."""
        if self.batch_size:
            return self.batch_size
        return COX_BATCH if self.task == "survival" and self.survival_loss == "cox" else 1

    def outputs(self, classes: list[str] | tuple[str, ...]) -> list[str]:
        """What the model's head outputs: the classes, or for survival what :mod:`wsi_fl.mil.survival` reads.

        Cox reads a 2-output head as ``eta = logit_1 - logit_0``; discrete time has one hazard logit per bin.
        """
        if self.task == "classification":
            return list(classes)
        if self.survival_loss == "cox":
            return ["baseline", "log-risk"]
        return [f"hazard-{k}" for k in range(self.time_bins)]

    def risk_range(self) -> tuple[float, float]:
        """The risk axis of the survival histograms (auto: what the loss's risk score spans in practice)."""
        if (self.hist_risk_min, self.hist_risk_max) != (0.0, 0.0):
            return self.hist_risk_min, self.hist_risk_max
        return (-5.0, 5.0) if self.survival_loss == "cox" else (-float(self.time_bins), 0.0)

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any], **overrides: Any) -> FedConfig:
        """Parse Flower's run config (hyphenated keys). Unknown keys are an error, missing ones take defaults."""
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k.replace("-", "_"): v for k, v in run_config.items()}
        unknown = sorted(_key(k) for k in set(values) - known)
        if unknown:
            raise ConfigError(f"unknown run config keys: {', '.join(unknown)}")
        return cls(**{**values, **overrides})

    def to_run_config(self) -> dict[str, Any]:
        return {_key(k): v for k, v in dataclasses.asdict(self).items()}

    def mil_config(self, in_dim: int, n_classes: int) -> MILConfig:
        return MILConfig(in_dim=in_dim, n_classes=n_classes, **{k: getattr(self, k) for k in MODEL_FIELDS})

    @staticmethod
    def model_fields(mil: MILConfig) -> dict[str, Any]:
        """The FedConfig keyword arguments that make :meth:`mil_config` rebuild ``mil``'s model settings."""
        return {k: getattr(mil, k) for k in MODEL_FIELDS}

    def train_config(self) -> TrainConfig:
        """The local optimisation settings each site applies (one round = ``local_epochs`` epochs)."""
        return TrainConfig(epochs=self.local_epochs, lr=self.lr, weight_decay=self.weight_decay,
                           optimizer=self.optimizer, class_weighting=self.class_weighting,
                           early_stopping="none", max_instances=self.max_instances or None, seed=self.seed,
                           device="auto", batch_size=self.effective_batch_size())


def _key(name: str) -> str:
    return name.replace("_", "-")


def _is(value: Any, type_name: str) -> bool:
    expected = {"str": str, "int": int, "float": float, "bool": bool}[type_name]
    if type_name == "bool":
        return isinstance(value, bool)
    return isinstance(value, expected) and not isinstance(value, bool)
