"""Flower's message-API strategies behind one registry, built from a :class:`~wsi_fl.federation.config.FedConfig`.

Adding a strategy is one decorated function. The server's own round loop
(:mod:`wsi_fl.server.loop`) calls a strategy's ``configure_*``/``aggregate_train``
so it can screen replies, checkpoint and resume between rounds; the state a
strategy carries across rounds (FedAdam/FedYogi's moments) is saved and restored
through :func:`strategy_state` and :func:`load_strategy_state`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAdam, FedAvg, FedMedian, FedProx, FedTrimmedAvg, FedYogi, Strategy

from wsi_fl._registry import Registry
from wsi_fl.federation.arrays import reply_metrics
from wsi_fl.federation.config import CENTRAL_DP, FedConfig
from wsi_fl.privacy.central import KEY_DP_WEIGHT

StrategyFactory = Callable[[FedConfig], Strategy]
#: Every strategy a run config may name; ``federation.config.StrategyName`` lists the same names for the
#: sites and the CLI, which must not import Flower's server (a test keeps the two equal).
STRATEGIES: Registry[StrategyFactory] = Registry("strategy")

#: Attributes of Flower's strategies that change from round to round and must survive a restart.
_STATEFUL = ("m_t", "v_t")


def register_strategy(name: str) -> Callable[[StrategyFactory], StrategyFactory]:
    return STRATEGIES.register(name)


def list_strategies() -> list[str]:
    return STRATEGIES.names()


def create_strategy(cfg: FedConfig) -> Strategy:
    return STRATEGIES.get(cfg.strategy)(cfg)


def _common(cfg: FedConfig) -> dict[str, Any]:
    return {
        "fraction_train": cfg.fraction_train,
        "fraction_evaluate": cfg.fraction_evaluate,
        "min_train_nodes": cfg.min_train_nodes,
        "min_evaluate_nodes": cfg.min_evaluate_nodes,
        # min-available-nodes gates the start only (wsi_fl.server.loop.query_sites). Flower waits, without a time limit,
        # for max(this, its sample size) sites before every sample: 0 leaves just the sample size (at least
        # min-train-/min-evaluate-nodes), which the round loop's wait_for_sites has waited for with round-timeout.
        "min_available_nodes": 0,
        # FedAvg weights each site by its number of training bags; under central DP equally (privacy.KEY_DP_WEIGHT).
        # Under slide-dpsgd each update is private already and bag counts are public, so the usual weights stay.
        "weighted_by_key": KEY_DP_WEIGHT if cfg.dp in CENTRAL_DP else "num-examples",
    }


def _fedopt(cfg: FedConfig) -> dict[str, Any]:
    return {"eta": cfg.server_lr, "eta_l": cfg.lr, "beta_1": cfg.server_beta_1, "beta_2": cfg.server_beta_2,
            "tau": cfg.server_tau}


def effective_sites(weights: Iterable[float]) -> float:
    """1 / sum(w_i^2) of the normalised weights: 3 for three equal sites, 1 when one site has all the weight."""
    w = np.asarray(list(weights), dtype=np.float64)
    return float(w.sum() ** 2 / np.square(w).sum())


class ServerStep:
    """FedAvg's weighted mean, then a server step of ``server_step`` times the move from the global model to it.

    Why: with one local epoch per round, each site takes as many optimizer steps as it has bags, and the mean of the
    sites' moves goes about 1/sum(w^2) times less far than an epoch of pooled training over the same bags (the
    sites' moves are averaged where pooled training's add up). At the same total epochs, plain FedAvg is
    under-trained by that factor; ``server_step = 0`` scales the mean move back by it each round (the effective
    number of sites that replied), a number the server already knows from the weights. Any other value is a
    fixed server learning rate (Reddi et al. 2021's FedOpt with SGD at the server; 1 is plain FedAvg). The global
    model is taken from ``configure_train`` every round, so there is no state to checkpoint.

    Measured (scripts/bench_federated.py --server-step 0, four MIL tables x two skews, 5 seeds): auto changed
    FedAvg's test AUC by -0.031 to +0.032 per cell, -0.005 on average, so it stays off by default.
    """

    weighted_by_key: str

    def __init__(self, server_step: float = 1.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.server_step = server_step
        self._global: ArrayRecord | None = None

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self._global = arrays
        return super().configure_train(server_round, arrays, config, grid)  # type: ignore[misc]

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        mean, metrics = super().aggregate_train(server_round, replies)  # type: ignore[misc]
        if mean is None or self.server_step == 1.0 or self._global is None:
            return mean, metrics
        step = self.server_step or effective_sites(
            reply_metrics(m)[self.weighted_by_key] for m in replies if m.has_content())
        return ArrayRecord({key: Array(_step(self._global[key].numpy(), array.numpy(), step))
                            for key, array in mean.items()}), metrics


def _step(old: np.ndarray, mean: np.ndarray, step: float) -> np.ndarray:
    if not np.issubdtype(old.dtype, np.floating):
        return mean
    return np.asarray(old + step * (mean - old), dtype=old.dtype)


class StepFedAvg(ServerStep, FedAvg):
    pass


class StepFedProx(ServerStep, FedProx):
    pass


@register_strategy("fedavg")
def fedavg(cfg: FedConfig) -> Strategy:
    return StepFedAvg(server_step=cfg.server_step, **_common(cfg))


@register_strategy("fedprox")
def fedprox(cfg: FedConfig) -> Strategy:
    """FedAvg aggregation; sites add ``mu/2 ||w - w_global||^2`` to their loss (``proximal-mu`` in config)."""
    return StepFedProx(server_step=cfg.server_step, proximal_mu=cfg.proximal_mu, **_common(cfg))


@register_strategy("fedadam")
def fedadam(cfg: FedConfig) -> Strategy:
    return FedAdam(**_common(cfg), **_fedopt(cfg))


@register_strategy("fedyogi")
def fedyogi(cfg: FedConfig) -> Strategy:
    return FedYogi(**_common(cfg), **_fedopt(cfg))


@register_strategy("fedmedian")
def fedmedian(cfg: FedConfig) -> Strategy:
    """Coordinate-wise median: robust to one outlying site, unweighted by site size."""
    return FedMedian(**_common(cfg))


@register_strategy("fedtrimmedavg")
def fedtrimmedavg(cfg: FedConfig) -> Strategy:
    return FedTrimmedAvg(beta=cfg.trim_beta, **_common(cfg))


def strategy_state(strategy: Strategy) -> dict[str, dict[str, np.ndarray]]:
    """The strategy's cross-round state as plain arrays (empty for stateless strategies)."""
    return {name: {k: np.array(v) for k, v in value.items()}
            for name in _STATEFUL if (value := getattr(strategy, name, None))}


def load_strategy_state(strategy: Strategy, state: dict[str, dict[str, np.ndarray]]) -> None:
    for name, value in state.items():
        if name not in _STATEFUL or not hasattr(strategy, name):
            raise ValueError(f"saved strategy state {name!r} does not belong to {type(strategy).__name__}")
        setattr(strategy, name, {k: np.array(v) for k, v in value.items()})
