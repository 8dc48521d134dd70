"""The federated round loop: train, screen replies, aggregate, evaluate, checkpoint, resume.

Flower's ``Strategy.start`` runs all rounds in one call; this loop calls the
same strategy's ``configure_train``/``aggregate_train``/``configure_evaluate``
itself, because a hospital federation needs what happens between those calls:

* **Screening** (:mod:`wsi_fl.server.replies`). A failed, late or malformed
  reply is logged and dropped; the round aggregates the rest if at least
  ``min-train-nodes`` replies are valid, and otherwise keeps the global model
  unchanged.
* **Federated metrics** from summed histograms and confusion counts
  (:func:`~wsi_fl.server.replies.aggregate_evaluation`): the pooled AUC over
  all sites' slides, while no per-slide score leaves a site; for survival the
  pooled C-index and time-dependent AUC from summed time x risk count grids
  (:func:`~wsi_fl.server.replies.aggregate_survival_evaluation`).
* **Checkpoints and resume.** After every round: ``state.pt`` (global weights,
  strategy state, round, best score), ``last.pt`` and, when the validation
  metric improves, ``best.pt`` (both in ``wsi-fl train``'s checkpoint format),
  a line in ``metrics.jsonl`` (and ``metrics.png`` every 10 rounds and at the end). With ``resume`` a restarted
  server continues after the last completed round.

Before the first round the sites are surveyed (:mod:`wsi_fl.server.sites`).
``FederationError``, ``client_config`` and ``query_sites`` are importable from
here too, where callers have always imported them.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid
from flwr.serverapp.exception import AggregationError, InconsistentMessageReplies
from flwr.supercore.differential_privacy import KEY_NORM_BIT

from models import create_model
from models.checkpoint import save_checkpoint
from preprocessing.atomic import atomic_path, write_text_atomic
from wsi_fl import __version__
from wsi_fl.federation import arrays as fedarrays
from wsi_fl.federation.config import MODEL_KEYS, FedConfig
from wsi_fl.mil.config import SplitRecord
from wsi_fl.privacy.central import KEY_DP_WEIGHT, PrivacyLedger, make_plan, set_sample_size, wrap_strategy
from wsi_fl.server.replies import (
    TRAIN_METRICS,
    aggregate_evaluation,
    aggregate_survival_evaluation,
    screen_replies,
    summarise,
)
from wsi_fl.server.sites import FederationError, client_config, query_sites, wait_for_sites
from wsi_fl.server.strategies import create_strategy, load_strategy_state, strategy_state

__all__ = ["FedResult", "FederationError", "ServerRun", "client_config", "drive", "query_sites", "run_server"]

log = logging.getLogger("wsi_fl.server")

#: Settings a resumed run must share with the run it continues (the rest, e.g. rounds, may change).
_RESUME_KEYS = ("strategy", *MODEL_KEYS, "seed", "val-frac", "test-frac", "label-col", "dp", "dp-epsilon", "dp-delta",
                "dp-noise-multiplier", "dp-clipping-norm", "dp-batch-size", "secagg", "task", "survival-loss",
                "time-bins", "time-col", "event-col", "hist-time-min", "hist-time-max")
#: ... and under slide-dpsgd also what each site's noise is calibrated over (its steps in the whole run).
_RESUME_KEYS_DPSGD = ("num-server-rounds", "local-epochs")


@dataclass
class FedResult:
    out_dir: Path
    rounds_completed: int
    history: list[dict[str, Any]] = field(default_factory=list)
    best_round: int | None = None


def _score(metrics: dict[str, float], select_on: str) -> float:
    """Higher is better; without a validation split (``val-frac`` 0) every round beats the last."""
    key = select_on  # val-auc, val-c-index
    if key in ("val-auc", "val-c-index") and not math.isnan(metrics.get(key, math.nan)):
        return metrics[key]
    if select_on in ("val-auc", "val-c-index", "val-loss") and "val-loss" in metrics:
        return -metrics["val-loss"]
    return math.inf


class ServerRun:
    """One federation's state on the server: the global model, its strategy, and what is written to disk."""

    def __init__(self, cfg: FedConfig, classes: list[str], feature_dim: int, provenance: dict[str, Any],
                 population: int = 0) -> None:
        self.cfg, self.classes, self.provenance = cfg, classes, provenance
        self.out = Path(cfg.out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(cfg.seed)
        self.model = create_model(cfg.mil_config(feature_dim, len(classes)))
        self.arrays = fedarrays.to_record(self.model.state_dict())
        self.strategy = create_strategy(cfg)
        plan = make_plan(cfg, max(population, 1))
        self.ledger = PrivacyLedger(plan) if plan else None
        if plan:
            self.strategy = wrap_strategy(self.strategy, plan, max(population, 1))
        self.round = 0
        self.best: tuple[float, int] | None = None
        self.history: list[dict[str, Any]] = []

    # -- persistence -------------------------------------------------------------------------------------------
    def save_state(self) -> None:
        state = {"round": self.round, "arrays": fedarrays.to_numpy(self.arrays), "best": self.best,
                 "strategy": strategy_state(self.strategy), "config": self.cfg.to_run_config(),
                 "classes": self.classes, "provenance": self.provenance, "random": random.getstate(),
                 "privacy": self.privacy_state()}
        with atomic_path(self.out / "state.pt") as tmp:
            torch.save(state, tmp)

    def try_resume(self) -> bool:
        path = self.out / "state.pt"
        if not self.cfg.resume or not path.is_file():
            return False
        state = torch.load(path, weights_only=False)
        # A key the saved run predates had its default there (e.g. input-norm, dp-batch-size).
        saved, now = FedConfig().to_run_config() | state["config"], self.cfg.to_run_config()
        keys = _RESUME_KEYS + (_RESUME_KEYS_DPSGD if self.cfg.dp == "slide-dpsgd" else ())
        changed = [k for k in keys if saved[k] != now[k]]
        if changed or state["classes"] != self.classes:
            what = ", ".join(f"{k}: {saved[k]!r} -> {now[k]!r}" for k in changed) or "classes differ"
            raise FederationError(f"{path}: cannot resume a run with other settings ({what})")
        self.arrays = ArrayRecord({k: fedarrays.Array(v) for k, v in state["arrays"].items()})
        load_strategy_state(self.strategy, state["strategy"])
        self.round, self.best = int(state["round"]), state["best"]
        random.setstate(state["random"])
        self.load_privacy_state(state.get("privacy"))
        self.history = self._read_history(upto=self.round)
        log.info("resuming after round %d of %d from %s", self.round, self.cfg.num_server_rounds, path)
        return True

    def privacy_state(self) -> dict[str, Any] | None:
        """The ledger and the current clipping norm (adaptive clipping changes it every round)."""
        if self.ledger is None:
            return None
        return {**self.ledger.state_dict(), "clipping_norm": float(self.strategy.clipping_norm)}

    def load_privacy_state(self, state: dict[str, Any] | None) -> None:
        """Continue the saved ledger with the saved noise: a resumed run spends from the same budget."""
        if self.ledger is None or state is None:
            return
        self.ledger = PrivacyLedger.from_state(state)
        self.strategy = wrap_strategy(create_strategy(self.cfg), self.ledger.plan, self.ledger.plan.population)
        self.strategy.clipping_norm = state["clipping_norm"]

    def _read_history(self, upto: int) -> list[dict[str, Any]]:
        path = self.out / "metrics.jsonl"
        if not path.is_file():
            return []
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        return [r for r in rows if r["round"] <= upto]  # drop a round logged but not checkpointed

    def save_checkpoint(self, name: str) -> Path:
        self.model.load_state_dict(fedarrays.to_state_dict(self.arrays))
        meta = {"package_version": __version__, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "mode": "federated", "round": self.round, "fed_config": self.cfg.to_run_config(),
                "label_col": self.cfg.label_col,
                # how each site split its slides (no slide id: the server never has one), for wsi-fl evaluate
                "splits": SplitRecord(self.cfg.seed, self.cfg.val_frac, self.cfg.test_frac,
                                      self.cfg.label_col).to_meta(),
                "metrics": self.history[-1] if self.history else {}}
        return save_checkpoint(self.out / name, self.model, self.classes, self.provenance, meta)

    def write_metrics(self) -> None:
        """``metrics.jsonl`` every round; the PNG every 10 rounds and at the end (plotting costs ~0.5 s)."""
        write_text_atomic(self.out / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in self.history))
        if self.round % 10 == 0 or self.round >= self.cfg.num_server_rounds:
            from wsi_fl.evaluation.plots import plot_federated_history

            plot_federated_history(self.history, self.out / "metrics.png")

    # -- one round ---------------------------------------------------------------------------------------------
    def require_sites(self, grid: Grid, needed: int, what: str) -> None:
        """:func:`wait_for_sites` with round-timeout; its error also says how to resume."""
        try:
            wait_for_sites(grid, needed, self.cfg.round_timeout, what)
        except FederationError as err:
            raise FederationError(f"{err}; round {self.round} is saved in {self.out}: run again with "
                                  "resume=true once enough sites are back") from None

    def instruction(self) -> ConfigRecord:
        """:func:`client_config` with this run's noise multiplier."""
        return client_config(self.cfg, self.classes, self.ledger.plan.noise_multiplier if self.ledger else None)

    def train_metric_keys(self) -> set[str]:
        """A training reply's metric keys: adaptive clipping at the site adds whether it clipped; under slide-dpsgd
        a site sends the ε it has spent instead of its training loss (which is not private)."""
        if self.cfg.dp == "slide-dpsgd":
            return {"num-examples", "dp-epsilon"}
        return TRAIN_METRICS | ({KEY_NORM_BIT} if self.cfg.dp == "client-adaptive" else set())

    def check_budget(self, server_round: int) -> None:
        if self.ledger is not None and self.ledger.next_release_exceeds():
            raise FederationError(f"round {server_round} would spend more than the privacy budget (epsilon "
                                  f"{self.ledger.plan.target_epsilon} at delta {self.ledger.plan.delta}; spent "
                                  f"{self.ledger.epsilon:.3f} in {self.ledger.releases} rounds): the run stops here")

    def prepare_private_round(self, messages: list[Message], valid: list[Message]) -> bool:
        """Under DP, aggregate only if every sampled site sent a valid update, with equal weights.

        The noise is calibrated to the mean of exactly the sampled sites (``σ C / m``): a mean over fewer would
        be under-noised, so such a round publishes nothing (and spends nothing).
        """
        sampled = set_sample_size(self.strategy, messages)
        if len(valid) < sampled:
            log.warning("round %d: %d of %d sampled sites sent a valid update; under differential privacy a round "
                        "aggregates all or none, so the global model is unchanged", self.round + 1, len(valid),
                        sampled)
            return False
        for reply in valid:
            fedarrays.reply_metrics(reply)[KEY_DP_WEIGHT] = 1
        return True

    def aggregate(self, server_round: int, messages: list[Message], valid: list[Message], row: dict[str, Any]) -> None:
        """The new global model from the valid updates, when there are enough (else it stays); fills ``row``."""
        if self.ledger is not None and not self.prepare_private_round(messages, valid):
            new_arrays, train_metrics = None, None
        elif len(valid) < self.cfg.min_train_nodes:
            log.warning("round %d: %d valid updates < min-train-nodes %d; the global model is unchanged",
                        server_round, len(valid), self.cfg.min_train_nodes)
            new_arrays, train_metrics = None, None
        else:
            try:
                new_arrays, train_metrics = self.strategy.aggregate_train(server_round, valid)
            except (AggregationError, InconsistentMessageReplies) as err:  # keep the model, go on to next round
                log.warning("round %d: aggregation failed (%s); the global model is unchanged", server_round, err)
                new_arrays, train_metrics = None, None
        if new_arrays is not None and self.ledger is not None:
            self.ledger.spend()
        self.adopt(new_arrays, train_metrics, len(valid), row)
        if self.cfg.dp == "slide-dpsgd" and valid:  # the most any site has spent: what the release guarantees
            row.update({"dp-epsilon": max(float(fedarrays.reply_metrics(m)["dp-epsilon"]) for m in valid),
                        "dp-delta": self.cfg.dp_delta})
        if self.ledger is not None:
            row.update({"dp-epsilon": self.ledger.epsilon, "dp-delta": self.ledger.plan.delta,
                        "dp-releases": self.ledger.releases, "dp-noise-multiplier": self.ledger.plan.noise_multiplier,
                        "dp-clipping-norm": float(self.strategy.clipping_norm)})

    def adopt(self, new_arrays: ArrayRecord | None, train_metrics: Any, n_updates: int, row: dict[str, Any]) -> None:
        """Make the strategy's result the global model (float32), if there is one; record it and the train loss."""
        if new_arrays is not None:
            self.arrays = ArrayRecord({k: fedarrays.Array(np.asarray(v, dtype=np.float32))
                                       for k, v in fedarrays.to_numpy(new_arrays).items()})
            row["aggregated"] = n_updates
        if train_metrics is not None and "train-loss" in train_metrics:
            row["train-loss"] = float(train_metrics["train-loss"])

    def run_round(self, grid: Grid) -> dict[str, Any]:
        cfg, server_round, start = self.cfg, self.round + 1, time.perf_counter()
        self.require_sites(grid, cfg.min_train_nodes, f"round {server_round}")
        config = self.instruction()
        if self.ledger is not None:
            self.check_budget(server_round)
        messages = list(self.strategy.configure_train(server_round, self.arrays, config, grid))
        replies = list(grid.send_and_receive(messages, timeout=cfg.round_timeout))
        valid, failed, rejected, sent = screen_replies(replies, self.arrays, cfg.transport, self.train_metric_keys())
        row: dict[str, Any] = {"round": server_round, "sampled": len(messages), "replies": len(replies),
                               "failed": failed, "rejected": rejected, "aggregated": 0}
        if sent:
            row["bytes-per-client"] = float(np.mean(sent))
        self.aggregate(server_round, messages, valid, row)
        self.finish_round(grid, row, start)
        return row

    def finish_round(self, grid: Grid, row: dict[str, Any], start: float) -> None:
        """Federated evaluation of the new global model, then checkpoints, metrics and state (any training path)."""
        cfg, server_round = self.cfg, row["round"]
        self.require_sites(grid, cfg.min_evaluate_nodes, f"round {server_round} evaluation")
        eval_messages = list(self.strategy.configure_evaluate(server_round, self.arrays, self.instruction(), grid))
        eval_replies = list(grid.send_and_receive(eval_messages, timeout=cfg.round_timeout))
        if cfg.task == "survival":
            row.update(aggregate_survival_evaluation(eval_replies, cfg))
        else:
            row.update(aggregate_evaluation(eval_replies, len(self.classes), cfg.auc_bins))
        row["seconds"] = round(time.perf_counter() - start, 3)
        self.round = server_round
        self.history.append(row)
        score = _score(row, cfg.select_on)
        if self.best is None or score > self.best[0] or math.isinf(score):
            self.best = (score, server_round)
            self.save_checkpoint("best.pt")
        self.save_checkpoint("last.pt")
        self.write_metrics()
        self.save_state()
        log.info("round %d/%d: %s", server_round, cfg.num_server_rounds, summarise(row))


def run_server(grid: Grid, cfg: FedConfig) -> FedResult:
    """Run (or resume) a federation to ``num-server-rounds``; see the module doc for what is written."""
    random.seed(cfg.seed)  # Flower samples nodes with `random`
    sites = query_sites(grid, cfg)
    log.info("federation: %d classes %s, %d-d features from %s", len(sites.classes), sites.classes,
             sites.feature_dim, sites.provenance.get("encoder"))
    return drive(ServerRun(cfg, cfg.outputs(sites.classes), sites.feature_dim, sites.provenance,
                           population=len(list(grid.get_node_ids()))), grid)


def drive(run: ServerRun, grid: Grid) -> FedResult:
    """Resume ``run`` if its out-dir holds a saved state, then run its rounds to ``num-server-rounds``."""
    run.try_resume()
    while run.round < run.cfg.num_server_rounds:
        run.run_round(grid)
    return FedResult(out_dir=run.out, rounds_completed=run.round, history=run.history,
                     best_round=run.best[1] if run.best else None)
