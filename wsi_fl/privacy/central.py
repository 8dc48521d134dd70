"""Central differential privacy for a federation: Flower's DP wrappers, calibrated to a target ε and accounted.

The privacy unit is a **site** (client-level DP, McMahan et al. 2018): each
round every sampled site's update ``w_site - w_global`` is clipped to L2 norm
``C`` (by the site itself with ``client-*`` modes, through Flower's
``fixedclipping_mod``/``adaptiveclipping_mod`` in :mod:`wsi_fl.site.clipping`; by the server with
``server-*``), the server averages the clipped updates with equal weights and
adds Gaussian noise of standard deviation ``σ C / m`` (``m`` sites sampled).
The released global models are then (ε, δ)-DP with respect to adding or
removing one whole site, which covers every patient of that site.

Accounting uses Flower's RDP accountant (Google's ``dp-accounting``) with no
sampling amplification: a federation of a few hospitals samples nearly all of
them every round, so amplification would overstate the guarantee. One
Gaussian release is composed per round whose aggregate is published; a round
that could not aggregate all the sites it sampled publishes nothing and spends
nothing. With a target ``dp-epsilon`` the noise multiplier is the smallest
that keeps ``num-server-rounds`` releases within it, and the run stops before a
release that would exceed it.

What it costs: the noise is per coordinate, the signal is at most ``C`` over
all coordinates, and ``m`` is the number of sites, so with three hospitals the
guarantee costs much more accuracy than with hundreds of clients. The
benchmark in the README quotes the figures.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Any

from flwr.app import Message
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideAdaptiveClipping,
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
    Strategy,
)
from flwr.supercore.privacy_accounting import (
    GaussianPrivacyEvent,
    NeighboringRelation,
    PrivacyConfig,
    SamplingMethod,
)
from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

from wsi_fl.errors import ConfigError
from wsi_fl.federation.config import CENTRAL_DP, FedConfig

log = logging.getLogger("wsi_fl.privacy")

#: The metric every update is weighted by under DP: the server sets it to 1 (equal weights; weighting by bag
#: count would let a large site move the mean by more than C/m).
KEY_DP_WEIGHT = "dp-weight"


@dataclass(frozen=True)
class PrivacyPlan:
    """The noise of a federation, fixed when it starts and kept on resume."""

    mode: str
    noise_multiplier: float
    clipping_norm: float
    delta: float
    population: int
    target_epsilon: float | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _accountant(delta: float, population: int, max_epsilon: float | None = None) -> RdpAccountant:
    return RdpAccountant(PrivacyConfig(target_delta=delta, population_size=population,
                                       neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
                                       sampling_method=SamplingMethod.NO_AMPLIFICATION, max_epsilon=max_epsilon))


def epsilon_after(noise_multiplier: float, releases: int, delta: float, population: int = 1) -> float:
    """ε at ``delta`` after ``releases`` Gaussian releases with this noise multiplier."""
    acc = _accountant(delta, population)
    acc.compose(GaussianPrivacyEvent(noise_multiplier, population, population), releases)
    return acc.get_epsilon(delta)


def calibrate_noise(target_epsilon: float, delta: float, releases: int) -> float:
    """The smallest noise multiplier (to 0.1 %) whose ε after ``releases`` releases is at most the target."""
    return bisect_noise(lambda sigma: epsilon_after(sigma, releases, delta), target_epsilon, delta)


def bisect_noise(epsilon_of: Callable[[float], float], target_epsilon: float, delta: float) -> float:
    """The smallest noise multiplier (to 0.1 %) with ``epsilon_of(sigma) <= target_epsilon`` (ε falls with σ)."""
    lo, hi = 1e-2, 1.0
    while epsilon_of(hi) > target_epsilon:
        lo, hi = hi, hi * 2
        if hi > 1e6:
            raise ConfigError(f"no noise multiplier reaches epsilon {target_epsilon} at delta {delta}")
    while hi - lo > 1e-3 * hi:
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if epsilon_of(mid) <= target_epsilon else (mid, hi)
    return hi


@lru_cache(maxsize=32)
def _calibrated(target_epsilon: float, delta: float, releases: int) -> float:
    return calibrate_noise(target_epsilon, delta, releases)


def planned_noise(cfg: FedConfig) -> float:
    """The noise multiplier ``cfg`` asks for: calibrated to ``dp-epsilon`` over its rounds, else as given."""
    if cfg.dp_epsilon:
        return _calibrated(cfg.dp_epsilon, cfg.dp_delta, cfg.num_server_rounds)
    return cfg.dp_noise_multiplier


def make_plan(cfg: FedConfig, population: int) -> PrivacyPlan | None:
    """The federation's noise (None without DP); ``population``: sites connected at the start."""
    if cfg.dp not in CENTRAL_DP:
        return None
    target = cfg.dp_epsilon or None
    sigma = planned_noise(cfg)
    plan = PrivacyPlan(mode=cfg.dp, noise_multiplier=sigma, clipping_norm=cfg.dp_clipping_norm, delta=cfg.dp_delta,
                       population=population, target_epsilon=target)
    log.info("differential privacy (%s): noise multiplier %.3f, clipping norm %g, %s", cfg.dp, sigma,
             cfg.dp_clipping_norm, f"epsilon <= {target} at delta {cfg.dp_delta} over {cfg.num_server_rounds} rounds"
             if target else f"epsilon reported each round at delta {cfg.dp_delta}")
    return plan


def wrap_strategy(strategy: Strategy, plan: PrivacyPlan, sample_size: int) -> Strategy:
    """Flower's DP wrapper for ``plan.mode`` around ``strategy`` (weighted by :data:`KEY_DP_WEIGHT`).

    Adaptive clipping spends part of the noise on the count of clipped sites;
    its standard deviation is at least ``σ`` so that with a handful of sites
    (Flower's default, m/20, is meant for hundreds) the update noise stays
    within 15 % of ``σ``.
    """
    sigma, norm = plan.noise_multiplier, plan.clipping_norm
    if plan.mode.endswith("fixed"):
        cls = (DifferentialPrivacyClientSideFixedClipping if plan.mode.startswith("client")
               else DifferentialPrivacyServerSideFixedClipping)
        return cls(strategy, sigma, norm, sample_size)
    cls = (DifferentialPrivacyClientSideAdaptiveClipping if plan.mode.startswith("client")
           else DifferentialPrivacyServerSideAdaptiveClipping)
    return cls(strategy, sigma, sample_size, initial_clipping_norm=norm,
               clipped_count_stddev=max(sample_size / 20, sigma))


class PrivacyLedger:
    """The privacy spent so far: one Gaussian release per published aggregate."""

    def __init__(self, plan: PrivacyPlan) -> None:
        self.plan = plan
        self.accountant = _accountant(plan.delta, plan.population, plan.target_epsilon)

    def _event(self) -> GaussianPrivacyEvent:
        return GaussianPrivacyEvent(self.plan.noise_multiplier, self.plan.population, self.plan.population)

    def next_release_exceeds(self) -> bool:
        return self.plan.target_epsilon is not None and self.accountant.would_exceed(
            self._event(), self.plan.target_epsilon * (1 + 1e-9))

    def spend(self) -> None:
        self.accountant.compose(self._event())

    @property
    def epsilon(self) -> float:
        return 0.0 if self.accountant.num_releases == 0 else self.accountant.get_epsilon(self.plan.delta)

    @property
    def releases(self) -> int:
        return self.accountant.num_releases

    def state_dict(self) -> dict[str, Any]:
        return {"plan": self.plan.to_dict(), "accountant": self.accountant.state_dict()}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> PrivacyLedger:
        ledger = cls(PrivacyPlan(**state["plan"]))
        ledger.accountant.load_state_dict(state["accountant"])
        return ledger


def set_sample_size(strategy: Strategy, messages: Iterable[Message]) -> int:
    """Tell the DP wrapper how many sites this round sampled (the noise divides by it); returns the count."""
    count = len(list(messages))
    if hasattr(strategy, "num_sampled_clients") and count:
        strategy.num_sampled_clients = count
    return count
