"""The federated benchmark's protocol and runs: pooled vs local vs federated attention-MIL on one cohort.

Why one :class:`Protocol` for everything: the benchmark asks whether federation
costs accuracy, so every training mode gets the same model, optimiser and total
epochs E, with no per-dataset or per-mode tuning. Pooled and local models train
E epochs with :func:`wsi_fl.mil.fit.fit`; a federated model runs E rounds of one
local epoch per site through the real ClientApp/ServerApp (the in-process
InlineGrid by default, identical results to the simulation engine). All models
of a seed are scored on the same slides, the union of every site's held-out test
split, so their AUCs can be compared per seed (:mod:`wsi_fl.benchmarks.results`).

A stored result counts for this protocol when its :meth:`Protocol.fingerprint`
matches. FedAvg/FedProx's server step and FedProx's mu are deliberately kept out
of it and carried in the model name instead (:meth:`Protocol.fed_name`), so one
results file holds plain and stepped FedAvg, and FedProx under the mu the first
results were stored under (:data:`LEGACY_MU`, named plain ``fedprox``) beside
FedProx under today's default (``fedprox mu 1``).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from models import MILConfig
from wsi_fl.benchmarks.cohorts import Cohort, describe
from wsi_fl.benchmarks.results import Results
from wsi_fl.evaluation.compare import score_models
from wsi_fl.evaluation.evaluate import EvalOptions
from wsi_fl.federation.config import STEP_STRATEGIES, FedConfig
from wsi_fl.mil.fit import Site, fit
from wsi_fl.mil.training import TrainConfig

STRATEGIES = ("fedavg", "fedprox", "fedadam", "fedyogi", "fedmedian", "fedtrimmedavg")
LEGACY_MU = 0.01  # FedProx's mu of every result stored before --proximal-mu existed (FedConfig's default then)
#: The deployment engine's rehearsal (a SuperLink and SuperNodes on loopback), run as a user runs it.
LOCAL_FEDERATION = [sys.executable, "-m", "wsi_fl", "rehearse"]  # the command an operator runs
#: Run-config keys that script sets from its own options (--rounds, --out, --seed) and refuses in --run-config.
_SCRIPT_KEYS = ("num-server-rounds", "out-dir", "seed")


@dataclass(frozen=True)
class Protocol:
    """The one configuration of every model in the benchmark (no per-dataset or per-mode tuning)."""

    epochs: int = 40
    optimizer: str = "adamw"
    lr: float = 5e-4
    weight_decay: float = 1e-3
    # Off: the tables are near-balanced overall, while per-site inverse-frequency weights under label skew give
    # every site a differently reweighted objective (seed 0 of musk1/label: FedAvg 0.80 with, 0.87 without).
    class_weighting: bool = False
    val_frac: float = 0.15
    test_frac: float = 0.25
    model: MILConfig = field(default_factory=MILConfig)  # in_dim and n_classes come from the data
    # FedAvg/FedProx's server step (FedConfig.server_step; 0: auto). Not in the fingerprint: it changes only those
    # two strategies, whose results carry it in their model name instead (fed_name), so one results file holds both.
    server_step: float = 1.0
    # FedProx's mu (FedConfig's default), likewise kept out of the fingerprint: a FedProx result run with any other
    # mu than the one the first results were stored under (LEGACY_MU) is named for it ("fedprox mu 1"), so both sit
    # in one file.
    proximal_mu: float = FedConfig.proximal_mu

    def train_config(self, seed: int) -> TrainConfig:
        return TrainConfig(epochs=self.epochs, lr=self.lr, weight_decay=self.weight_decay, optimizer=self.optimizer,
                           class_weighting=self.class_weighting, early_stopping="none", seed=seed)

    def fed_name(self, strategy: str) -> str:
        """The result's model name: the strategy, plus its server step where that is not plain FedAvg's 1, and
        FedProx's mu where that is not LEGACY_MU."""
        name = strategy
        if strategy == "fedprox" and self.proximal_mu != LEGACY_MU:
            name += f" mu {self.proximal_mu:g}"
        if self.server_step != 1.0 and strategy in STEP_STRATEGIES:
            name += f" step {'auto' if self.server_step == 0 else f'{self.server_step:g}'}"
        return name

    def fed_config(self, strategy: str, seed: int, n_sites: int, out_dir: Path,
                   transport: str = "float32") -> FedConfig:
        step = self.server_step if strategy in STEP_STRATEGIES else 1.0
        return FedConfig(num_server_rounds=self.epochs, local_epochs=1, strategy=strategy, server_step=step,
                         **FedConfig.model_fields(self.model), optimizer=self.optimizer, lr=self.lr,
                         weight_decay=self.weight_decay, class_weighting=self.class_weighting, seed=seed,
                         proximal_mu=self.proximal_mu, val_frac=self.val_frac,
                         test_frac=self.test_frac, min_available_nodes=n_sites, min_train_nodes=n_sites,
                         min_evaluate_nodes=n_sites, transport=transport, out_dir=str(out_dir))

    def fingerprint(self) -> dict[str, Any]:
        """What must match for a stored result to count as this protocol's (the server step is in fed_name)."""
        found = {k: v for k, v in dataclasses.asdict(self).items() if k not in ("server_step", "proximal_mu")}
        if found["model"]["input_norm"] == "none":  # added later: results stored before it still count
            del found["model"]["input_norm"]
        return found


# -- training ------------------------------------------------------------------------------------------------------

def train_fit(sites: Sequence[Site], out: Path, proto: Protocol, seed: int) -> Path:
    """Pooled (several sites) or local (one site) training; returns the checkpoint."""
    result = fit(sites, out, model=proto.model, train=proto.train_config(seed), val_frac=proto.val_frac,
                 test_frac=proto.test_frac, eval_opts=EvalOptions(n_bootstrap=0), progress=False)
    return result.checkpoint


def run_inline(cohort_root: Path, n_sites: int, cfg: FedConfig) -> None:
    from wsi_fl.engines.inline import InlineGrid
    from wsi_fl.server.loop import run_server
    from wsi_fl.site.app import make_client_app

    run_server(InlineGrid(make_client_app(cohort_root), [{"partition-id": i} for i in range(n_sites)]), cfg)


def run_simulation(cohort_root: Path, n_sites: int, cfg: FedConfig) -> None:
    from wsi_fl.engines.simulation import simulate

    logger = logging.getLogger("wsi_fl")
    level = logger.level
    try:
        simulate(cohort_root, cfg)
    finally:
        logger.setLevel(level)  # simulate() turns on the per-round INFO log; keep the rest of the output as it was


def run_deployment(cohort_root: Path, n_sites: int, cfg: FedConfig) -> None:
    """A SuperLink, one SuperNode per site and ``flwr run`` on loopback (``wsi-fl rehearse``).

    Run as its own process through the script's command line, as an operator runs it: the deployment engine's
    processes (SuperLink, SuperNodes, the apps they launch) are then stopped by that script, whatever happens here.
    Its progress goes to stderr as it comes; its verdict line is kept for the error.
    """
    import tomli_w

    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    extra = out / "run-config.toml"  # everything but rounds/out/seed, which the script sets itself
    extra.write_text(tomli_w.dumps({k: v for k, v in cfg.to_run_config().items() if k not in _SCRIPT_KEYS}))
    cmd = [*LOCAL_FEDERATION, "--cohort", str(cohort_root), "--out", str(out),
           "--rounds", str(cfg.num_server_rounds), "--seed", str(cfg.seed), "--run-config", str(extra),
           "--workdir", str(out / "deployment"), "--timeout", "3600"]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        verdict = (proc.stdout.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
        raise RuntimeError(f"deployment run failed: {verdict}")


ENGINES: dict[str, Callable[[Path, int, FedConfig], None]] = {
    "inline": run_inline, "simulation": run_simulation, "deployment": run_deployment}


def train_federated(cohort: Cohort, out: Path, proto: Protocol, strategy: str, engine: str,
                    transport: str = "float32") -> Path:
    """``proto.epochs`` rounds of one local epoch; returns the last round's global model."""
    cfg = proto.fed_config(strategy, cohort.seed, len(cohort.sites), out, transport)
    ENGINES[engine](cohort.root, len(cohort.sites), cfg)
    return out / "last.pt"


def plan(cohort: Cohort, runs: Path, proto: Protocol, strategies: Sequence[str],
         engine: str) -> list[tuple[str, Callable[[], Path]]]:
    """(model name, trainer returning its checkpoint) for every model of one dataset/skew/seed."""
    out = runs / cohort.dataset / cohort.skew / f"seed{cohort.seed}"
    jobs: list[tuple[str, Callable[[], Path]]] = [
        ("pooled", lambda: train_fit(cohort.sites, out / "pooled", proto, cohort.seed))]
    for site in cohort.sites:
        jobs.append((f"local:{site.name}",
                     lambda site=site: train_fit([site], out / f"local_{site.name}", proto, cohort.seed)))
    for s in strategies:
        name = proto.fed_name(s)
        jobs.append((name, lambda s=s, name=name: train_federated(cohort, out / name.replace(" ", "_"), proto, s,
                                                                  engine)))
    return jobs


#: The federated strategy of the unseen-site column: FedConfig's default, plain FedAvg.
UNSEEN_STRATEGY = "fedavg"


def unseen_names(proto: Protocol) -> tuple[str, str]:
    """The results' model names of the unseen-site column: (pooled, federated)."""
    return "unseen pooled", f"unseen {proto.fed_name(UNSEEN_STRATEGY)}"


def run_unseen(cohort: Cohort, results: Results, runs: Path, proto: Protocol, resume: bool) -> None:
    """Leave-one-site-out (:mod:`wsi_fl.evaluation.unseen`) on one dataset/skew/seed; one result row per mode.

    Each fold trains on every slide of the other sites (no val/test split, E epochs or E rounds) and scores all
    slides of the site left out; a row's ``auc`` is the mean over held-out sites (NaN-free sites only), and
    ``per_site`` keeps each site's AUC, 95 % bootstrap interval and slide counts.
    """
    from wsi_fl.evaluation.unseen import leave_one_site_out

    tag = f"{cohort.dataset}/{cohort.skew} seed {cohort.seed}"
    base = {"protocol": proto.fingerprint(), "dataset": cohort.dataset, "skew": cohort.skew, "seed": cohort.seed}
    names = dict(zip(("pooled", "federated"), unseen_names(proto), strict=True))
    if resume and all(results.has(**base, model=name) for name in names.values()):
        print(f"[{tag}] unseen site      already in {results.path}, skipped", flush=True)
        return
    out = runs / cohort.dataset / cohort.skew / f"seed{cohort.seed}" / "unseen"
    fed = proto.fed_config(UNSEEN_STRATEGY, cohort.seed, len(cohort.sites) - 1, out)
    start = time.perf_counter()
    rows = leave_one_site_out(cohort.root, out, train=proto.train_config(cohort.seed), fed=fed)
    seconds = time.perf_counter() - start
    for mode, name in names.items():
        mine = [r for r in rows if r.mode == mode]
        aucs = [r.auc for r in mine if not math.isnan(r.auc)]
        auc = sum(aucs) / len(aucs) if aucs else math.nan
        per_site = {r.held_out: {"auc": None if math.isnan(r.auc) else r.auc, "ci95": r.ci, "n": r.n_slides,
                                 "n_positive": r.n_positive} for r in mine}
        results.append({**base, "model": name, "kind": "run", "epochs": proto.epochs, "engine": "inline",
                        "auc": auc, "per_site": per_site, "seconds": round(seconds, 2), "sites": describe(cohort)})
        sites = "  ".join(f"{r.held_out} {r.auc:.3f}" for r in mine)
        print(f"[{tag}] {name:<16} mean over held-out sites {auc:.3f}  ({sites})", flush=True)


def print_unseen_table(results: Results, proto: Protocol, combos: Sequence[tuple[str, str]],
                       seeds: Sequence[int]) -> None:
    """Seen (held-out slides of the training sites) beside unseen (a whole site left out) AUC, mean ± std."""
    from wsi_fl.benchmarks.results import format_cell, per_seed

    rows = [r for r in results.rows if r.get("protocol") == proto.fingerprint() and r.get("seed") in seeds]
    fed = proto.fed_name(UNSEEN_STRATEGY)
    columns = ["pooled", fed, *unseen_names(proto)]
    print(f"\nunseen site: AUC on a whole site left out of training (mean over held-out sites), beside the test AUC "
          f"on held-out slides of the training sites; mean ± std over seeds {list(seeds)}")
    print(f"{'dataset/skew':<18}" + "".join(f"{c:>22}" for c in columns))
    for dataset, skew in combos:
        cols = per_seed(rows, dataset, skew)
        cells = [format_cell(list(cols.get(c, {}).values()), len(seeds)) for c in columns]
        print(f"{dataset + '/' + skew:<18}" + "".join(f"{c:>22}" for c in cells))
        by_site: dict[str, dict[str, list[float]]] = {}  # held-out site -> column -> its AUC per seed
        for r in rows:
            if r.get("kind") == "run" and (r["dataset"], r["skew"]) == (dataset, skew) and "per_site" in r:
                for site, m in r["per_site"].items():
                    if m.get("auc") is not None:
                        by_site.setdefault(site, {}).setdefault(r["model"], []).append(m["auc"])
        for site, per in sorted(by_site.items()):
            cells = ["", ""] + [format_cell(per.get(c, []), len(seeds)) for c in unseen_names(proto)]
            print(f"{'  ' + site + ' left out':<18}" + "".join(f"{c:>22}" for c in cells))


def score(checkpoint: Path, cohort: Cohort, proto: Protocol) -> tuple[float, float, int]:
    """(test AUC, accuracy, slides) on the union of every site's held-out split."""
    (s,) = score_models({"m": checkpoint}, cohort.sites, val_frac=proto.val_frac, test_frac=proto.test_frac,
                        seed=cohort.seed)
    return s.auc, s.accuracy, s.n


def run_cohort(cohort: Cohort, results: Results, runs: Path, proto: Protocol, strategies: Sequence[str],
               engine: str, resume: bool) -> None:
    """Every model of one dataset/skew/seed, trained, scored and appended to ``results`` (skipped if there)."""
    tag = f"{cohort.dataset}/{cohort.skew} seed {cohort.seed}"
    print(f"[{tag}] {describe(cohort)}", flush=True)
    for name, trainer in plan(cohort, runs, proto, strategies, engine):
        base = {"protocol": proto.fingerprint(), "dataset": cohort.dataset, "skew": cohort.skew,
                "seed": cohort.seed, "model": name}
        if resume and results.has(**base):
            print(f"[{tag}] {name:<16} already in {results.path}, skipped", flush=True)
            continue
        start = time.perf_counter()
        checkpoint = trainer()
        seconds = time.perf_counter() - start
        auc, acc, n = score(checkpoint, cohort, proto)
        results.append({**base, "kind": "run", "epochs": proto.epochs, "engine": engine, "auc": auc,
                        "accuracy": acc, "n_test": n, "seconds": round(seconds, 2), "sites": describe(cohort)})
        print(f"[{tag}] {name:<16} test AUC {auc:.3f}  acc {acc:.3f}  n {n}  {seconds:7.1f} s", flush=True)
