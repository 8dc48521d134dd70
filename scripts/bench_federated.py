"""Federated vs pooled vs local attention-MIL on non-IID three-site splits, and the federation's overhead.

Protocol (one configuration for everything, :class:`Protocol`): MILConfig
defaults (gated attention), AdamW, lr 5e-4, weight decay 1e-3, no class
weights, no early stopping (the last epoch's model is scored), every site
split on its own into train/val/test = 0.60/0.15/0.25 by patient with the run's
seed. Every training mode runs the same total epochs E (``--epochs``):

* pooled: :func:`wsi_fl.mil.fit.fit` on all sites' training bags, E epochs;
* local: the same on one site, E epochs, for every site; "best local" is, per
  seed, the highest of the sites' local AUCs (the strictest reading); the goal
  lines also give "best site", the site whose local model has the highest mean
  AUC over seeds (a site keeps its role across seeds: the 0.8-positive or the
  55 % site is always site_3);
* federated: E rounds of 1 local epoch per site, for every strategy in
  ``--strategies``, with the real ClientApp/ServerApp (in-process InlineGrid by
  default, identical results to ``--engine simulation``); the last round's
  global model is scored.

All models of a seed are scored with :func:`wsi_fl.evaluation.compare.score_models` on the
same slides: the union of every site's held-out test split. The table shows the
mean ± sample std (ddof 1) of that test AUC over seeds.

Datasets. The classic MIL bag tables in ``$WSI_FL_TESTDATA/mil`` (default
``../shared/data/mil``; musk1, musk2, fox, tiger): every bag becomes one HDF5
feature file (instances z-scored per feature with the mean/std of the *whole*
table, all bags of both classes, a label-free transductive normalisation shared
by every training mode; coords a dummy grid; patient id = bag id). The bags are
dealt to three sites by a seeded, deterministic non-IID split:

* ``label`` skew: site positive rates about 0.2 / 0.5 / 0.8 at similar sizes
  (positives dealt 0.2:0.5:0.8, negatives 0.8:0.5:0.2; exact when the table is
  balanced, e.g. musk2's 38 % positives gives about 0.13 / 0.38 / 0.71);
* ``size`` skew: sites get about 15 % / 30 % / 55 % of the bags, stratified by label.

Every site keeps at least 2 bags of each class. The seed picks the partition as
well as the weights and splits, so the spread over seeds includes the partition's.
``--synthetic DIR`` adds an existing cohort directory used as is (e.g. the
``cohort/`` of ``wsi-fl demo``, whose sites differ by stain; every site needs
``features/`` and ``labels.csv``), shown as ``synthetic/as-is``.

``--server-step S`` runs FedAvg/FedProx with that server step (``FedConfig.server_step``; 0: auto, the
effective number of sites); their results are stored as ``fedavg step S`` beside the plain ones, and the
other models' results are shared, so ``--strategies fedavg --server-step 0 --resume`` on an existing results
file adds one column. ``--proximal-mu M`` does the same for FedProx's mu (default FedConfig's, 1; results are
named ``fedprox mu M``, and plain ``fedprox`` is mu 0.01, ``LEGACY_MU``, the default the first results were run
under: give ``--proximal-mu 0.01`` to print or extend those).

Goals checked under the table: the better of FedAvg/FedProx (mean over seeds)
≥ pooled − 0.02 and ≥ best local. ``--overhead`` (first dataset and skew, first
seed, FedAvg) times pooled ``fit`` against the real simulation engine
(``wsi_fl.engines.simulation.simulate``, Ray start-up included) and the inline engine at
the same epochs (goal: simulation ÷ pooled ≤ 1.5), and reports the bytes each
site sent per round against the model's float32 size (4 × parameters; goal
≤ 1.05×) and a float16-transport run's bytes and test-AUC loss (goals ½ and ≤ 0.01).
``--deployment`` adds the deployment engine (a SuperLink and three SuperNodes on
loopback, ``scripts/run_local_federation.py``) at the same seed: its time and its
test AUC against the simulation's (goal: within 0.01).

The dataset ``wsiscale`` (``--datasets wsiscale``) is for timing: ``--wsi-scale
BAGS INSTANCES`` random 1024-d float16 bags, sized like whole-slide embeddings
(a 20× slide gives thousands of tiles), half of them with a small planted
signal. Simulation start-up (a Ray cluster, ~30 s here) is a fixed cost, so the
overhead ratio depends on the workload: the MIL tables' bags have 2-100
instances and train in seconds, which no fixed cost can hide.

Every run is appended as one JSON line to ``--results`` (default
``<work>/results.jsonl``); ``--resume`` skips runs already there with the same
protocol and epochs, and the table is built from the file, so interrupted
benchmarks keep their work. The full benchmark (hours on 2 cores)::

    python scripts/bench_federated.py --work /tmp/benchfed --resume [--synthetic demo-out/cohort] [--overhead]

Overhead at whole-slide scale, and the deployment engine against the simulation::

    python scripts/bench_federated.py --datasets wsiscale --skews size --seeds 0 --overhead --no-table
    python scripts/bench_federated.py --datasets musk1 --skews label --seeds 0 --epochs 10 --overhead \
        --no-table --deployment

A small check::

    python scripts/bench_federated.py --datasets musk1 --skews label --seeds 0 --strategies fedavg fedprox --epochs 10
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models import MILConfig
from models.checkpoint import load_checkpoint
from preprocessing.h5format import REQUIRED_ATTRS, FeatureWriter
from wsi_fl.evaluation.compare import score_models
from wsi_fl.evaluation.evaluate import EvalOptions
from wsi_fl.federation.config import STEP_STRATEGIES, FedConfig
from wsi_fl.mil.data import TableBagDataset
from wsi_fl.mil.fit import Site, fit
from wsi_fl.mil.training import TrainConfig
from wsi_fl.site.data import discover_cohort

STRATEGIES = ("fedavg", "fedprox", "fedadam", "fedyogi", "fedmedian", "fedtrimmedavg")
GOAL_STRATEGIES = ("fedavg", "fedprox")
DATASETS = ("musk1", "musk2", "fox", "tiger")
SKEWS = ("label", "size")
LABEL_SKEW_RATES = (0.2, 0.5, 0.8)  # target positive rate of each site
SIZE_SKEW_SHARES = (0.15, 0.30, 0.55)  # share of the bags of each site
WSI_SCALE_DIM = 1024  # feature width of the "wsiscale" timing cohort (a ResNet-50 trunk / UNI-sized embedding)
MIN_PER_CLASS = 2  # bags of each class every site keeps, so its own train/val/test split works
POOLED_MARGIN = 0.02
LEGACY_MU = 0.01  # FedProx's mu of every result stored before --proximal-mu existed (FedConfig's default then)


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


@dataclass(frozen=True)
class Cohort:
    dataset: str
    skew: str
    seed: int
    root: Path
    sites: tuple[Site, ...]


# -- bag tables -> cohort directories ----------------------------------------------------------------------------

def feature_attrs(dataset: str, slide_id: str) -> dict[str, Any]:
    """Provenance of a bag-table feature file: one made-up 'encoder' per table, so tables never mix."""
    attrs: dict[str, Any] = {k: "mil-table" for k in REQUIRED_ATTRS if k not in ("feature_dim", "feature_dtype")}
    attrs.update(slide_id=slide_id, source_file=f"{dataset}.csv", encoder=f"mil-table-{dataset}",
                 weights="zscore-whole-table", mpp=1.0, target_mpp=1.0, tile_size=1, tile_size_level0=1.0,
                 stride=1, read_level=0, min_tissue=0.0)
    return attrs


def write_bag_files(table: Path, dataset: str, out: Path) -> tuple[list[str], np.ndarray]:
    """Every bag of the table as ``out/<slide_id>.h5`` (reused when complete); returns slide ids and targets."""
    ds = TableBagDataset.from_csv(table)
    if len(ds.classes) != 2:
        raise ValueError(f"{table}: the non-IID splits need a binary table, got classes {ds.classes}")
    slide_ids = [f"{dataset}_b{bag}" for bag in ds.groups]
    stamp = {"table": str(table.resolve()), "size": table.stat().st_size, "mtime_ns": table.stat().st_mtime_ns,
             "bags": len(ds)}
    marker = out / ".complete.json"
    if marker.is_file() and json.loads(marker.read_text()) == stamp:
        return slide_ids, np.asarray(ds.targets)
    allx = torch.cat(ds.features).numpy().astype(np.float64)
    mean, std = allx.mean(axis=0), allx.std(axis=0)
    std[std == 0] = 1.0
    for slide_id, x in zip(slide_ids, ds.features, strict=True):
        z = ((x.numpy() - mean) / std).astype(np.float32)
        n = len(z)
        coords = np.stack([np.arange(n) % 64, np.arange(n) // 64], axis=1)
        with FeatureWriter(out / f"{slide_id}.h5", z.shape[1], feature_attrs(dataset, slide_id)) as w:
            w.append(coords, z)
            w.commit()
    marker.write_text(json.dumps(stamp))
    return slide_ids, np.asarray(ds.targets)


def write_wsi_scale_bags(out: Path, n_bags: int, n_instances: int, seed: int = 0) -> tuple[list[str], np.ndarray]:
    """``n_bags`` random bags sized like whole-slide embeddings (``n_instances`` × 1024, float16), for timing.

    Half are positive: 5 % of their instances are shifted by +1 in the first 64 features (a small "tumour"),
    so the models learn something and the engines' AUCs can be compared. Reused when complete.
    """
    slide_ids = [f"wsiscale_b{i:03d}" for i in range(n_bags)]
    targets = np.arange(n_bags) % 2
    stamp = {"bags": n_bags, "instances": n_instances, "seed": seed, "dim": WSI_SCALE_DIM}
    marker = out / ".complete.json"
    if marker.is_file() and json.loads(marker.read_text()) == stamp:
        return slide_ids, targets
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    n_side = math.ceil(math.sqrt(n_instances))
    coords = np.stack([np.arange(n_instances) % n_side, np.arange(n_instances) // n_side], axis=1)
    for slide_id, target in zip(slide_ids, targets, strict=True):
        x = rng.standard_normal((n_instances, WSI_SCALE_DIM), dtype=np.float32)
        if target:
            x[rng.choice(n_instances, max(n_instances // 20, 1), replace=False), :64] += 1.0
        with FeatureWriter(out / f"{slide_id}.h5", WSI_SCALE_DIM, feature_attrs("wsiscale", slide_id),
                           dtype="float16") as w:
            w.append(coords, x)
            w.commit()
    marker.write_text(json.dumps(stamp))
    return slide_ids, targets


def apportion(total: int, shares: Sequence[float]) -> list[int]:
    """``total`` split in proportion to ``shares`` (largest remainder), then topped up to MIN_PER_CLASS."""
    w = np.asarray(shares, dtype=float) / sum(shares)
    raw = w * total
    counts = np.floor(raw).astype(int)
    for k in np.argsort(-(raw - counts), kind="stable")[: total - counts.sum()]:
        counts[k] += 1
    if total < MIN_PER_CLASS * len(shares):
        raise ValueError(f"{total} bags of a class cannot give {len(shares)} sites {MIN_PER_CLASS} each")
    while (short := np.flatnonzero(counts < MIN_PER_CLASS)).size:
        counts[short[0]] += 1
        counts[int(np.argmax(counts))] -= 1
    return counts.tolist()


def class_shares(skew: str) -> tuple[list[float], list[float]]:
    """(share of the positives, share of the negatives) each site receives."""
    if skew == "label":
        return list(LABEL_SKEW_RATES), [1 - r for r in LABEL_SKEW_RATES]
    if skew == "size":
        return list(SIZE_SKEW_SHARES), list(SIZE_SKEW_SHARES)
    raise ValueError(f"unknown skew {skew!r}; choose from {', '.join(SKEWS)}")


def partition(targets: np.ndarray, skew: str, seed: int) -> np.ndarray:
    """Site index (0, 1, 2) of every bag: deterministic for (targets, skew, seed)."""
    rng = np.random.default_rng(seed)
    site = np.full(len(targets), -1)
    for cls, shares in zip((1, 0), class_shares(skew), strict=True):
        idx = rng.permutation(np.flatnonzero(targets == cls))
        bounds = np.cumsum([0, *apportion(len(idx), shares)])
        for k in range(len(shares)):
            site[idx[bounds[k]:bounds[k + 1]]] = k
    return site


def build_cohort(work: Path, table: Path, dataset: str, skew: str, seed: int,
                 wsi_scale: tuple[int, int] = (0, 0)) -> Cohort:
    """``work/<dataset>/<skew>-seed<k>/site_<i>/{labels.csv, features/}``; features are links to the bag files.

    ``dataset`` "wsiscale" is :func:`write_wsi_scale_bags` with ``wsi_scale`` = (bags, instances per bag).
    """
    bags = work / dataset / "bags"
    if dataset == "wsiscale":
        slide_ids, targets = write_wsi_scale_bags(bags, *wsi_scale)
    else:
        slide_ids, targets = write_bag_files(table, dataset, bags)
    site_of = partition(targets, skew, seed)
    root = work / dataset / f"{skew}-seed{seed}"
    for k in range(int(site_of.max()) + 1):
        site_dir = root / f"site_{k + 1}"
        (site_dir / "features").mkdir(parents=True, exist_ok=True)
        rows = ["slide_id,label,patient_id"]
        for i in np.flatnonzero(site_of == k):
            link = site_dir / "features" / f"{slide_ids[i]}.h5"
            if not link.is_symlink():
                link.symlink_to((bags / f"{slide_ids[i]}.h5").resolve())
            rows.append(f"{slide_ids[i]},{targets[i]},{slide_ids[i].split('_b', 1)[1]}")
        (site_dir / "labels.csv").write_text("\n".join(rows) + "\n")
    return Cohort(dataset, skew, seed, root, tuple(discover_cohort(root)))


def synthetic_cohort(directory: Path, seed: int) -> Cohort:
    return Cohort("synthetic", "as-is", seed, directory.resolve(), tuple(discover_cohort(directory)))


def describe(cohort: Cohort) -> str:
    parts = []
    for site in cohort.sites:
        labels = [line.split(",")[1] for line in site.labels.read_text().splitlines()[1:] if line.strip()]
        pos = sum(label == max(labels) for label in labels)
        parts.append(f"{site.name} {len(labels)} bags {pos / len(labels):.0%} pos")
    return "; ".join(parts)


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
    """A SuperLink, one SuperNode per site and ``flwr run`` on loopback (``scripts/run_local_federation.py``)."""
    import tomli_w
    from run_local_federation import OWN_KEYS, run_local_federation, summary

    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    extra = out / "run-config.toml"  # everything but rounds/out/seed, which the script sets itself
    extra.write_text(tomli_w.dumps({k: v for k, v in cfg.to_run_config().items() if k not in OWN_KEYS}))
    result = run_local_federation(cohort_root, out, cfg.num_server_rounds, seed=cfg.seed, run_config=str(extra),
                                  workdir=out / "deployment", timeout=3600.0)
    if not result["ok"]:
        raise RuntimeError(f"deployment run failed: {summary(result)}")


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


def score(checkpoint: Path, cohort: Cohort, proto: Protocol) -> tuple[float, float, int]:
    """(test AUC, accuracy, slides) on the union of every site's held-out split."""
    (s,) = score_models({"m": checkpoint}, cohort.sites, val_frac=proto.val_frac, test_frac=proto.test_frac,
                        seed=cohort.seed)
    return s.auc, s.accuracy, s.n


# -- results file --------------------------------------------------------------------------------------------------

class Results:
    """Per-run results as JSON lines, appended and flushed one by one (a killed run loses at most its own)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.rows: list[dict[str, Any]] = []
        if path.is_file():
            for line in path.read_text().splitlines():
                try:
                    self.rows.append(json.loads(line))
                except json.JSONDecodeError:  # a line cut short by a kill
                    continue

    @staticmethod
    def key(row: dict[str, Any]) -> tuple:
        return row.get("protocol"), row.get("dataset"), row.get("skew"), row.get("seed"), row.get("model")

    def has(self, **key: Any) -> bool:
        wanted = self.key(key)
        return any(self.key(r) == wanted for r in self.rows if r.get("kind") == "run")

    def append(self, row: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as fh:
            fh.write(json.dumps(row) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        self.rows.append(row)


def run_cohort(cohort: Cohort, results: Results, runs: Path, proto: Protocol, strategies: Sequence[str],
               engine: str, resume: bool) -> None:
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


# -- table -----------------------------------------------------------------------------------------------------------

def per_seed(rows: Iterable[dict[str, Any]], dataset: str, skew: str) -> dict[str, dict[int, float]]:
    """model column -> seed -> AUC for one table row; 'best local' is the max over all sites' local models.

    Each site's local model is a column too (``local:<site>``), for :func:`goal_check`'s best site.
    """
    cols: dict[str, dict[int, float]] = {}
    local: dict[int, list[float]] = {}
    for r in rows:
        if r.get("kind") != "run" or r["dataset"] != dataset or r["skew"] != skew:
            continue
        if r["model"].startswith("local:"):
            local.setdefault(r["seed"], []).append(r["auc"])
        cols.setdefault(r["model"], {})[r["seed"]] = r["auc"]
    n_sites = max((len(v) for v in local.values()), default=0)
    cols["best local"] = {seed: max(v) for seed, v in local.items() if len(v) == n_sites}
    return cols


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    vals = [v for v in values if not math.isnan(v)]
    if not vals:
        return math.nan, math.nan
    return float(np.mean(vals)), float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0


def format_cell(values: Sequence[float], n_seeds: int) -> str:
    if not values:
        return "-"
    m, s = mean_std(values)
    partial = "" if len(values) == n_seeds else f" ({len(values)})"
    return f"{m:.3f}{partial}" if len(values) == 1 else f"{m:.3f} ± {s:.3f}{partial}"


def goal_check(cols: dict[str, dict[int, float]], proto: Protocol) -> str:
    fed = {name: mean_std(list(cols[name].values()))[0] for name in map(proto.fed_name, GOAL_STRATEGIES)
           if cols.get(name)}
    if not fed or not cols.get("pooled") or not cols.get("best local"):
        return "incomplete"
    best = max(fed, key=lambda s: fed[s])
    pooled = mean_std(list(cols["pooled"].values()))[0]
    local = mean_std(list(cols["best local"].values()))[0]
    site = max(mean_std(list(v.values()))[0] for k, v in cols.items() if k.startswith("local:"))
    ok_pooled = "yes" if fed[best] >= pooled - POOLED_MARGIN else "NO"
    ok_local = "yes" if fed[best] >= local else "NO"
    ok_site = "yes" if fed[best] >= site else "NO"
    lo, hi = paired_interval(cols[best], cols["pooled"])
    return (f"{best} {fed[best]:.3f} >= pooled {pooled:.3f} - {POOLED_MARGIN}: {ok_pooled} "
            f"(paired {best} - pooled, 95% CI {lo:+.3f} to {hi:+.3f}); "
            f">= best local {local:.3f}: {ok_local}; >= best site {site:.3f}: {ok_site}")


def paired_interval(a: dict[int, float], b: dict[int, float], level: float = 0.95) -> tuple[float, float]:
    """Student-t interval of the mean per-seed difference a - b over the seeds both have (NaN for < 2 seeds).

    Both models of a seed share its partition, splits and test slides, so the paired difference removes most of
    the seed-to-seed spread that the table's ± carries.
    """
    from scipy import stats

    diffs = np.array([a[s] - b[s] for s in sorted(set(a) & set(b))])
    if len(diffs) < 2:
        return math.nan, math.nan
    half = stats.t.ppf((1 + level) / 2, len(diffs) - 1) * diffs.std(ddof=1) / math.sqrt(len(diffs))
    return float(diffs.mean() - half), float(diffs.mean() + half)


def print_table(results: Results, proto: Protocol, combos: Sequence[tuple[str, str]], seeds: Sequence[int],
                strategies: Sequence[str]) -> None:
    rows = [r for r in results.rows if r.get("protocol") == proto.fingerprint() and r.get("seed") in seeds]
    columns = ["pooled", "best local", *map(proto.fed_name, strategies)]
    width = 20
    print(f"\ntest AUC, mean ± std over seeds {list(seeds)} ({proto.epochs} epochs; '(k)': only k seeds done)")
    print(f"{'dataset/skew':<18}" + "".join(f"{c:>{width}}" for c in columns))
    checks = []
    for dataset, skew in combos:
        cols = per_seed(rows, dataset, skew)
        cells = [format_cell(list(cols.get(c, {}).values()), len(seeds)) for c in columns]
        print(f"{dataset + '/' + skew:<18}" + "".join(f"{c:>{width}}" for c in cells))
        checks.append(f"{dataset + '/' + skew:<18}{goal_check(cols, proto)}")
    print("\ngoals (better of FedAvg/FedProx by mean):")
    print("\n".join(checks))


# -- overhead --------------------------------------------------------------------------------------------------------

def bytes_per_round(out: Path) -> list[float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r["bytes-per-client"] for r in rows if "bytes-per-client" in r]


def round_seconds(out: Path) -> float:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return sum(r.get("seconds", 0.0) for r in rows)


def timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def overhead(cohort: Cohort, work: Path, proto: Protocol, results: Results, deployment: bool) -> None:
    out = work / "overhead" / cohort.dataset / cohort.skew / f"seed{cohort.seed}"
    n = len(cohort.sites)
    print(f"\noverhead: {cohort.dataset}/{cohort.skew} seed {cohort.seed}, {proto.epochs} epochs, FedAvg; "
          f"{describe(cohort)}", flush=True)
    t_pooled = timed(lambda: train_fit(cohort.sites, out / "pooled", proto, cohort.seed))
    print(f"  pooled fit                 {t_pooled:8.1f} s", flush=True)
    dirs = {name: out / f"fedavg-{name}" for name in ("simulation", "inline-f32", "inline-f16", "deployment")}
    t_sim = timed(lambda: run_simulation(cohort.root, n, proto.fed_config("fedavg", cohort.seed, n,
                                                                          dirs["simulation"])))
    print(f"  simulation engine          {t_sim:8.1f} s  (rounds {round_seconds(dirs['simulation']):.1f} s)",
          flush=True)
    t_inline = timed(lambda: run_inline(cohort.root, n, proto.fed_config("fedavg", cohort.seed, n,
                                                                         dirs["inline-f32"])))
    print(f"  inline engine              {t_inline:8.1f} s  (rounds {round_seconds(dirs['inline-f32']):.1f} s)",
          flush=True)
    run_inline(cohort.root, n, proto.fed_config("fedavg", cohort.seed, n, dirs["inline-f16"], transport="float16"))
    t_dep = math.nan
    if deployment:
        t_dep = timed(lambda: run_deployment(cohort.root, n, proto.fed_config("fedavg", cohort.seed, n,
                                                                              dirs["deployment"])))
        print(f"  deployment engine          {t_dep:8.1f} s  (rounds {round_seconds(dirs['deployment']):.1f} s)",
              flush=True)
    else:
        del dirs["deployment"]

    model, _ = load_checkpoint(dirs["simulation"] / "last.pt")
    n_params = sum(p.numel() for p in model.parameters())
    f32_size = 4 * n_params
    b32, b16 = bytes_per_round(dirs["simulation"]), bytes_per_round(dirs["inline-f16"])
    auc = {name: score(d / "last.pt", cohort, proto)[0] for name, d in dirs.items()}
    sim_rounds = round_seconds(dirs["simulation"])
    report = {
        "kind": "overhead", "protocol": proto.fingerprint(), "dataset": cohort.dataset, "skew": cohort.skew,
        "seed": cohort.seed, "epochs": proto.epochs, "sites": describe(cohort), "pooled_s": round(t_pooled, 2),
        "simulation_s": round(t_sim, 2), "simulation_rounds_s": round(sim_rounds, 2),
        "inline_s": round(t_inline, 2), "deployment_s": None if math.isnan(t_dep) else round(t_dep, 2),
        "params": n_params, "float32_model_bytes": f32_size, "bytes_per_client_f32": float(np.mean(b32)),
        "bytes_per_client_f16": float(np.mean(b16)), "auc": auc,
    }
    results.append(report)
    print(f"  simulation / pooled        {t_sim / t_pooled:8.2f}   (goal <= 1.5)")
    print(f"  simulation rounds / pooled {sim_rounds / t_pooled:8.2f}   (without Ray start/stop: "
          f"{t_sim - sim_rounds:.1f} s fixed)")
    print(f"  inline / pooled            {t_inline / t_pooled:8.2f}")
    if deployment:
        print(f"  deployment / pooled        {t_dep / t_pooled:8.2f}   (a fresh ClientApp process per message)")
    print(f"  model: {n_params} parameters, float32 size {f32_size} B")
    print(f"  bytes per client per round float32 {np.mean(b32):.0f} B (min {min(b32):.0f}, max {max(b32):.0f}) "
          f"= {np.mean(b32) / f32_size:.4f} x float32 size (goal <= 1.05)")
    print(f"  bytes per client per round float16 {np.mean(b16):.0f} B = {np.mean(b16) / np.mean(b32):.4f} x float32 "
          f"transport (goal 0.5)")
    print(f"  test AUC simulation {auc['simulation']:.4f}, inline float32 {auc['inline-f32']:.4f}, "
          f"inline float16 {auc['inline-f16']:.4f}: float16 loss {auc['inline-f32'] - auc['inline-f16']:+.4f} "
          f"(goal <= 0.01)")
    if deployment:
        print(f"  test AUC deployment {auc['deployment']:.4f}: deployment - simulation "
              f"{auc['deployment'] - auc['simulation']:+.4f} (goal within 0.01)")


# -- main ------------------------------------------------------------------------------------------------------------

def parse_args() -> argparse.Namespace:
    root = Path(__file__).resolve().parent.parent
    default_data = Path(os.environ.get("WSI_FL_TESTDATA", root.parent / "shared" / "data")) / "mil"
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=default_data, help="directory of the bag tables <name>.csv")
    ap.add_argument("--datasets", nargs="*", default=list(DATASETS), help="bag tables (none: only --synthetic)")
    ap.add_argument("--skews", nargs="+", default=list(SKEWS), choices=SKEWS)
    ap.add_argument("--synthetic", type=Path, help="an existing cohort directory, used as is")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    ap.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=STRATEGIES)
    ap.add_argument("--epochs", type=int, default=Protocol.epochs, help="total epochs of every training mode")
    ap.add_argument("--server-step", type=float, default=1.0,
                    help="FedAvg/FedProx server step (1: plain FedAvg; 0: auto, the effective number of sites)")
    ap.add_argument("--proximal-mu", type=float, default=Protocol.proximal_mu,
                    help=f"FedProx's proximal weight mu [%(default)s]; results under any other mu than {LEGACY_MU} "
                         "(the stored results' mu) are named 'fedprox mu M'")
    ap.add_argument("--engine", choices=sorted(ENGINES), default="inline")
    ap.add_argument("--work", type=Path, help="cohorts, models and results (default: a new temporary directory)")
    ap.add_argument("--results", type=Path, help="JSON-lines results file (default: <work>/results.jsonl)")
    ap.add_argument("--resume", action="store_true", help="skip runs already in the results file")
    ap.add_argument("--overhead", action="store_true", help="also time pooled vs federated and measure bytes")
    ap.add_argument("--no-table", action="store_true", help="only the overhead (with --overhead)")
    ap.add_argument("--deployment", action="store_true",
                    help="with --overhead: also run the deployment engine (SuperLink + SuperNodes on loopback)")
    ap.add_argument("--wsi-scale", nargs=2, type=int, default=[60, 4000], metavar=("BAGS", "INSTANCES"),
                    help="size of the 'wsiscale' dataset: random 1024-d bags like whole-slide embeddings "
                         "[%(default)s]")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (and OMP_NUM_THREADS for Ray workers)")
    ap.add_argument("--verbose", action="store_true", help="show Flower's per-round log")
    return ap.parse_args()


def main() -> int:
    args = parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    torch.set_num_threads(args.threads)
    if not args.verbose:
        import flwr.common  # noqa: F401  (sets Flower's logger to DEBUG on import: quieten it afterwards)

        logging.getLogger("flwr").setLevel(logging.WARNING)
    work = (args.work or Path(tempfile.mkdtemp(prefix="benchfed-"))).resolve()
    work.mkdir(parents=True, exist_ok=True)
    results = Results(args.results or work / "results.jsonl")
    print(f"work directory {work}; results {results.path}", flush=True)
    proto = Protocol(epochs=args.epochs, server_step=args.server_step, proximal_mu=args.proximal_mu)

    def cohorts_for(dataset: str, skew: str) -> list[Cohort]:
        if dataset == "synthetic":
            return [synthetic_cohort(args.synthetic, seed) for seed in args.seeds]
        return [build_cohort(work, args.data / f"{dataset}.csv", dataset, skew, seed, tuple(args.wsi_scale))
                for seed in args.seeds]

    combos = [(d, s) for d in args.datasets for s in args.skews]
    if args.synthetic is not None:
        combos.append(("synthetic", "as-is"))
    if not combos:
        print("nothing to run: give --datasets or --synthetic", file=sys.stderr)
        return 2
    if not args.no_table:
        for dataset, skew in combos:
            for cohort in cohorts_for(dataset, skew):
                run_cohort(cohort, results, work / "runs", proto, args.strategies, args.engine, args.resume)
        print_table(results, proto, combos, args.seeds, args.strategies)
    if args.overhead:
        overhead(cohorts_for(*combos[0])[0], work, proto, results, args.deployment)
    return 0


if __name__ == "__main__":
    sys.exit(main())
