"""Flower's message-API strategies behind one registry, built from a :class:`~wsi_fl.fedconfig.FedConfig`.

Adding a strategy is one decorated function. The server's own round loop
(:mod:`wsi_fl.fedserver`) calls a strategy's ``configure_*``/``aggregate_train``
so it can screen replies, checkpoint and resume between rounds; the state a
strategy carries across rounds (FedAdam/FedYogi's moments) is saved and restored
through :func:`strategy_state` and :func:`load_strategy_state`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from flwr.serverapp.strategy import FedAdam, FedAvg, FedMedian, FedProx, FedTrimmedAvg, FedYogi, Strategy

from .fedconfig import CENTRAL_DP, FedConfig
from .privacy import KEY_DP_WEIGHT

StrategyFactory = Callable[[FedConfig], Strategy]
_STRATEGIES: dict[str, StrategyFactory] = {}

#: Attributes of Flower's strategies that change from round to round and must survive a restart.
_STATEFUL = ("m_t", "v_t")


def register_strategy(name: str) -> Callable[[StrategyFactory], StrategyFactory]:
    def deco(fn: StrategyFactory) -> StrategyFactory:
        if name in _STRATEGIES:
            raise ValueError(f"strategy {name!r} is already registered")
        _STRATEGIES[name] = fn
        return fn

    return deco


def list_strategies() -> list[str]:
    return sorted(_STRATEGIES)


def create_strategy(cfg: FedConfig) -> Strategy:
    if cfg.strategy not in _STRATEGIES:
        raise ValueError(f"unknown strategy {cfg.strategy!r}; registered: {', '.join(list_strategies())}")
    return _STRATEGIES[cfg.strategy](cfg)


def _common(cfg: FedConfig) -> dict[str, Any]:
    return {
        "fraction_train": cfg.fraction_train,
        "fraction_evaluate": cfg.fraction_evaluate,
        "min_train_nodes": cfg.min_train_nodes,
        "min_evaluate_nodes": cfg.min_evaluate_nodes,
        # min-available-nodes gates the start only (fedserver.query_sites). Flower waits, without a time limit,
        # for max(this, its sample size) sites before every sample: 0 leaves just the sample size (at least
        # min-train-/min-evaluate-nodes), which fedserver.wait_for_sites has waited for with round-timeout.
        "min_available_nodes": 0,
        # FedAvg weights each site by its number of training bags; under central DP equally (privacy.KEY_DP_WEIGHT).
        # Under slide-dpsgd each update is private already and bag counts are public, so the usual weights stay.
        "weighted_by_key": KEY_DP_WEIGHT if cfg.dp in CENTRAL_DP else "num-examples",
    }


def _fedopt(cfg: FedConfig) -> dict[str, Any]:
    return {"eta": cfg.server_lr, "eta_l": cfg.lr, "beta_1": cfg.server_beta_1, "beta_2": cfg.server_beta_2,
            "tau": cfg.server_tau}


@register_strategy("fedavg")
def fedavg(cfg: FedConfig) -> Strategy:
    return FedAvg(**_common(cfg))


@register_strategy("fedprox")
def fedprox(cfg: FedConfig) -> Strategy:
    """FedAvg aggregation; sites add ``mu/2 ||w - w_global||^2`` to their loss (``proximal-mu`` in config)."""
    return FedProx(proximal_mu=cfg.proximal_mu, **_common(cfg))


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
