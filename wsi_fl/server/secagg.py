"""SecAgg+ secure aggregation on the FedAvg path: the server learns the weighted mean of the sites' models, not one.

Flower 1.41 offers SecAgg+ only on its workflow (legacy) API, so each round
here is: our strategy (:mod:`wsi_fl.server.strategies`) samples the sites and writes
their instruction exactly as on the plain path; Flower's ``SecAggPlusWorkflow``
runs the protocol over those sites (key set-up, secret-shared mask seeds,
masked upload, unmasking); the unmasked mean is then handed to our strategy as
the round's one update, so its server step applies unchanged (identity for
FedAvg/FedProx, the pseudo-gradient step for FedAdam/FedYogi). Evaluation,
checkpoints, ``metrics.jsonl`` and resume are :class:`~wsi_fl.server.loop.ServerRun`'s.

At a site, :func:`wsi_fl.site.secagg.secagg_mod` runs Flower's ``secaggplus_mod``
on SecAgg+ messages and translates the workflow's FitIns/FitRes content to and
from our ``train`` handler; every other message passes through. Each site uploads
``round(w q / M)`` and its model times ``w / M`` (``w`` its training bags,
``M`` the max weight), clipped to ``±secagg-clipping-range``, stochastically
quantised to ``secagg-quantization-range`` levels and masked, so only the
weighted mean is ever unmasked. docs/secure-aggregation.md has the threat
model, the parameters, the supported strategies and the measured costs.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.common import FitIns, FitRes, Parameters, parameters_to_ndarrays
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import FedAvg as LegacyFedAvg
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.serverapp import Grid

from wsi_fl.errors import ConfigError
from wsi_fl.federation import arrays as fedarrays
from wsi_fl.federation.config import SECAGG_KEY_CLIP as KEY_CLIP
from wsi_fl.federation.config import SECAGG_KEY_MAX_WEIGHT as KEY_MAX_WEIGHT
from wsi_fl.federation.config import SECAGG_KEY_NAMES as KEY_NAMES
from wsi_fl.federation.config import FedConfig
from wsi_fl.server.loop import FedResult, ServerRun, client_config, drive, query_sites

log = logging.getLogger("wsi_fl.server.secagg")

#: Strategies whose server step needs only the (weighted) mean of the sites' models.
SECAGG_STRATEGIES = ("fedavg", "fedprox", "fedadam", "fedyogi")
#: Every sampled site shares its mask seeds with every other (SecAgg's complete graph: cheap for tens of sites).
NUM_SHARES = 1.0
#: Shares needed to unmask, as a fraction of the shares: 3 sites -> 2 (one may drop out after key sharing).
RECONSTRUCTION_THRESHOLD = 2 / 3
#: Upper end of Flower's mask range; sums of quantised values must stay below it.
MODULUS_RANGE = 2**32
_F32 = float(np.finfo(np.float32).eps) / 2  # unit roundoff: Flower quantises float32 models in float32


def check_secagg_config(cfg: FedConfig) -> None:
    """A one-line ValueError when ``secagg`` is combined with settings it cannot honour."""
    if not cfg.secagg:
        return
    if cfg.strategy not in SECAGG_STRATEGIES:
        raise ConfigError(f"run config secagg = true needs strategy {', '.join(SECAGG_STRATEGIES)} (the server sees "
                          f"only the mean of the updates), not {cfg.strategy!r}")
    if cfg.dp != "none":
        raise ConfigError(f"run config secagg = true cannot be combined with dp = {cfg.dp!r} (not supported yet)")
    if cfg.min_train_nodes < 2:
        raise ConfigError("run config secagg = true needs min-train-nodes >= 2 (a sum of one update is the update)")
    if cfg.secagg_clipping_range <= 0 or not 1 < cfg.secagg_quantization_range < MODULUS_RANGE:
        raise ConfigError(f"run config secagg-clipping-range must be > 0 and secagg-quantization-range in "
                          f"(1, 2**32), not {cfg.secagg_clipping_range}, {cfg.secagg_quantization_range}")


def max_weight_for(train_sizes: Sequence[int]) -> float:
    """The power of two at or above the largest site: weights ``w / M <= 1`` and as fine a quantisation as safe."""
    return float(2 ** math.ceil(math.log2(max(max(train_sizes), 1))))


def quantisation_bound(train_sizes: Sequence[int], max_weight: float, clipping_range: float,
                       quantization_range: int, spread: float = 0.0) -> float:
    """Largest per-weight gap between the SecAgg+ mean and FedAvg's ``sum(w x) / sum(w)`` of the same models.

    A site's ``x w/M`` is stochastically rounded to a step ``2c/q`` (error below one step) after float32 arithmetic
    (below ``5 u c``); the n errors add up and the sum is divided by ``sum(w'/M)``, where ``w' = round(w q/M) M/q``
    is the weight as quantised. That weight rounding moves the mean by at most ``sum|w' - w| / sum(w') * spread``,
    with ``spread`` the largest ``|x_site - mean|``. Holds while no ``|x w/M|`` exceeds ``c`` (the sites check).
    """
    q_weights = [round(n / max_weight * quantization_range) / quantization_range for n in train_sizes]
    total = sum(q_weights)
    per_site = 2 * clipping_range / quantization_range + 5 * _F32 * clipping_range
    moved = sum(abs(qw - n / max_weight) for qw, n in zip(q_weights, train_sizes, strict=True)) / total
    return len(train_sizes) * per_site / total + moved * spread


# -- server ------------------------------------------------------------------------------------------------------

class _Carrier(LegacyFedAvg):
    """The legacy strategy SecAggPlusWorkflow drives: it hands the workflow the sites and instruction our strategy
    chose, and keeps what the workflow hands back: the unmasked mean (every result carries it), weights and losses.
    """

    def __init__(self, grid: Grid, instructions: list[Message], extra: dict[str, Any]) -> None:
        super().__init__(min_fit_clients=2, min_available_clients=2)
        self.grid, self.instructions, self.extra = grid, instructions, extra
        self.mean: list[np.ndarray] | None = None
        self.weights: list[int] = []
        self.train_loss = math.nan

    def configure_fit(self, server_round: int, parameters: Parameters,
                      client_manager: ClientManager) -> list[tuple[ClientProxy, FitIns]]:
        return [(GridClientProxy(m.metadata.dst_node_id, self.grid, self.grid.run.run_id),
                 FitIns(parameters, {**dict(m.content["config"].items()), **self.extra})) for m in self.instructions]

    def aggregate_fit(self, server_round: int, results: list[tuple[ClientProxy, FitRes]],
                      failures: list[Any]) -> tuple[Parameters | None, dict[str, Any]]:
        if not results:
            return None, {}
        self.mean = parameters_to_ndarrays(results[0][1].parameters)
        self.weights = [res.num_examples for _, res in results]
        self.train_loss = float(np.average([float(res.metrics["train-loss"]) for _, res in results],
                                           weights=self.weights))
        return results[0][1].parameters, {}


class SecAggRun(ServerRun):
    """A :class:`ServerRun` whose training step is SecAgg+ (evaluation and outputs are unchanged)."""

    def __init__(self, cfg: FedConfig, classes: list[str], feature_dim: int, provenance: dict[str, Any],
                 max_weight: float) -> None:
        super().__init__(cfg, classes, feature_dim, provenance)
        self.max_weight = max_weight
        self.workflow = SecAggPlusWorkflow(NUM_SHARES, RECONSTRUCTION_THRESHOLD, max_weight=max_weight,
                                           clipping_range=cfg.secagg_clipping_range,
                                           quantization_range=cfg.secagg_quantization_range,
                                           modulus_range=MODULUS_RANGE, timeout=cfg.round_timeout)

    def secure_round(self, grid: Grid, server_round: int) -> tuple[int, _Carrier]:
        """(sites sampled, the carrier holding the unmasked mean, or None if too few sites stayed)."""
        cfg = self.cfg
        messages = list(self.strategy.configure_train(server_round, self.arrays, client_config(cfg, self.classes),
                                                      grid))
        extra = {KEY_NAMES: list(self.arrays.keys()), KEY_CLIP: float(cfg.secagg_clipping_range),
                 KEY_MAX_WEIGHT: self.max_weight}
        carrier = _Carrier(grid, messages, extra)
        state = RecordDict({MAIN_PARAMS_RECORD: self.arrays,
                            MAIN_CONFIGS_RECORD: ConfigRecord({WorkflowKey.CURRENT_ROUND: server_round})})
        context = Context(run_id=grid.run.run_id, node_id=0, node_config={}, state=state, run_config={})
        self.workflow(grid, LegacyContext(context, strategy=carrier))
        return len(messages), carrier

    def run_round(self, grid: Grid) -> dict[str, Any]:
        cfg, server_round, start = self.cfg, self.round + 1, time.perf_counter()
        self.require_sites(grid, cfg.min_train_nodes, f"round {server_round}")
        sampled, carrier = self.secure_round(grid, server_round)
        row: dict[str, Any] = {"round": server_round, "sampled": sampled, "replies": len(carrier.weights),
                               "failed": sampled - len(carrier.weights), "rejected": 0, "aggregated": 0}
        if carrier.mean is None:
            log.warning("round %d: secure aggregation did not complete (fewer sites than its reconstruction "
                        "threshold stayed); the global model is unchanged", server_round)
        else:
            self.apply_mean(server_round, carrier, row)
        self.finish_round(grid, row, start)
        return row

    def apply_mean(self, server_round: int, carrier: _Carrier, row: dict[str, Any]) -> None:
        """Screen the mean (names, shapes, finite) and pass it to the strategy as the round's one update."""
        mean = ArrayRecord({name: Array(np.asarray(a, dtype=np.float32))
                            for name, a in zip(self.arrays.keys(), carrier.mean or [], strict=True)})
        reason = fedarrays.check_update(mean, self.arrays, "float32")
        if reason is not None:
            log.warning("round %d: rejected the secure mean (%s); the global model is unchanged", server_round, reason)
            return
        metrics = MetricRecord({"num-examples": sum(carrier.weights), "train-loss": carrier.train_loss})
        update = Message(RecordDict({"arrays": mean, "metrics": metrics}), dst_node_id=0,
                         message_type=MessageType.TRAIN)
        new_arrays, train_metrics = self.strategy.aggregate_train(server_round, [update])
        self.adopt(new_arrays, train_metrics, len(carrier.weights), row)


def run_secagg_server(grid: Grid, cfg: FedConfig) -> FedResult:
    """:func:`wsi_fl.server.loop.run_server` with SecAgg+ training rounds; writes and resumes the same outputs."""
    check_secagg_config(cfg)
    random.seed(cfg.seed)
    sites = query_sites(grid, cfg)
    max_weight = max_weight_for(sites.train_sizes)
    log.info("federation (SecAgg+): %d classes %s, %d-d features; max weight %g", len(sites.classes), sites.classes,
             sites.feature_dim, max_weight)
    return drive(SecAggRun(cfg, cfg.outputs(sites.classes), sites.feature_dim, sites.provenance, max_weight), grid)
