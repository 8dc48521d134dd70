"""GBSG2 across three hospitals split by tumour grade: pooled vs each site alone vs federated survival.

**Protocol, fixed before the first run** (nothing below was changed after seeing a test figure):

* Data: GBSG2 (scikit-survival's ``load_gbsg2``; 686 patients, recurrence-free survival in days, 299 events).
  Covariates one-hot encoded (:func:`wsi_fl.benchmarks.survival.gbsg2`) and standardised with the mean and scale
  of all training patients (a fixed feature map, standing in for a frozen patch encoder); each patient is a
  one-instance bag written as a real HDF5 feature file (``features/<patient>.h5``, the layout preprocessing
  writes), with a ``labels.csv`` of ``slide_id,time,event,split``.
* Sites, non-IID by tumour grade: ``grade_I`` (81 patients, 18 events), ``grade_II`` (444, 202) and ``grade_III``
  (161, 79). Grade I is the smallest but not tiny, so the three grades stay three sites (none merged). Within a
  site grade is constant: its effect cannot be learnt from one site's risk sets.
* Split, once, per site and stratified by event (seed 0): 60 % train, 15 % validation, 25 % test; written into
  every labels file (``split`` column), so every arm is tested on the same 173 held-out patients (75 events).
* Model and training, the same in every arm: attention MIL (hidden 16, attention 8, no dropout; on one-instance
  bags an MLP), Cox loss with risk sets within a batch of 32 bags of one site, Adam lr 3e-3, weight decay 1e-4,
  40 rounds of 1 local epoch, the round with the lowest validation loss selected (``best.pt``). Every arm runs
  through the real ClientApp and ServerApp loop on the in-process grid (:class:`wsi_fl.engines.inline.InlineGrid`):
  **pooled** = one site holding every site's patients (its train, validation and test splits the union of the
  sites'; one unstratified risk set per batch, the usual pooled analysis); **local** = each site alone (its own
  validation split selects its round); **federated** = the three sites under FedAvg.
* Survival histograms: time edges 0-3000 days (GBSG2's follow-up ends before 8.2 years) in 128 bins, risk -3..3 in
  128 bins, time-dependent AUC at 5 years (1825 days, moved to the nearest edge).
* Score: Harrell's C (scikit-survival) of each arm's selected model on the 173 test patients of all three sites,
  pooled; also each federated run's server-side C from the summed histograms of the same round. Model seeds 0, 1,
  2 (initial weights and batch order); the split stays that of seed 0. Reported: per seed and the mean.
* Goal (issue 20): federated >= pooled - 0.02 and federated >= every site alone, on the mean over seeds.

**Result** (``python scripts/bench_survival.py --federated /tmp/gbsg2-fl``, 2026-12-07, CPU, 2 shared cores under
load): mean test C over seeds 0/1/2: pooled 0.659, federated 0.622, grade I alone 0.475, grade II alone 0.616,
grade III alone 0.616. Federated beats every site alone, but falls 0.037 short of pooled: the goal's first half is
**not met**. A post-hoc diagnostic (not part of the protocol): the C-index counted within each site only (pairs of
one grade) is federated 0.629, pooled 0.626; the gap is the ordering *between* grades, which a Cox model whose
risk sets stay within a site cannot learn where grade is constant within each site (it is the site's baseline
hazard). An exploratory run with the discrete-time loss (hazards are absolute, so between-site differences are
learnable; 8 bins, otherwise this protocol) gave pooled 0.660, federated 0.640.

**Discrete-time follow-up, fixed on 2026-12-07 before its runs** (``--survival-loss discrete``,
:data:`DISCRETE_PROTOCOL`): the protocol above with one change, the discrete-time loss with 8 hazard bins of equal
width over the agreed 0-3000 days (the federation's bins; the histogram's risk axis the loss's own, -8..0).
The exploratory run above chose it on model seeds 0-2, so those seeds are development, not evidence: this runs
every arm (pooled, each grade alone, federated) on model seeds **3, 4 and 5**, which no run has used, with the
split unchanged. Same goals, on the mean over those three seeds; the Cox result above stays the pre-registered
result and a miss.

**Result** (``python scripts/bench_survival.py --federated /tmp/gbsg2-fl --survival-loss discrete --seeds 3 4 5``,
2026-12-07, 2 shared cores, 6 min): mean test C over seeds 3/4/5: pooled 0.663 (0.662/0.665/0.663), federated
0.635 (0.631/0.629/0.645), grade I alone 0.617, grade II alone 0.609, grade III alone 0.548. Federated beats every
site alone; it is 0.028 below pooled, so "federated >= pooled - 0.02" is **missed again**, by 0.008. Absolute
hazards did not close the gap on new seeds (the exploratory 0.020 on seeds 0-2 was at the edge). No further
variant is run for this goal.
"""

from __future__ import annotations

import csv
import logging
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.model_selection import train_test_split
from sksurv.datasets import load_gbsg2

from models.checkpoint import load_checkpoint
from preprocessing.h5format import FeatureWriter
from wsi_fl._logging import LOG_LEVEL_ENV
from wsi_fl.benchmarks.cohorts import feature_attrs
from wsi_fl.benchmarks.survival import gbsg2
from wsi_fl.engines.inline import InlineGrid
from wsi_fl.evaluation.survival import harrell_c
from wsi_fl.federation.config import FedConfig
from wsi_fl.mil.training import predict_risk
from wsi_fl.server.loop import run_server
from wsi_fl.site.app import make_client_app
from wsi_fl.site.data import discover_cohort, load_site

__all__ = ["DISCRETE_PROTOCOL", "PROTOCOL", "run_gbsg2_federated", "write_gbsg2_cohorts"]

GRADES = ("I", "II", "III")
#: The pre-registered settings of every arm (see the module docstring).
PROTOCOL = FedConfig(task="survival", survival_loss="cox", model="attention", hidden_dim=16, attn_dim=8, dropout=0.0,
                     lr=3e-3, weight_decay=1e-4, batch_size=32, num_server_rounds=40, local_epochs=1,
                     select_on="val-loss", hist_time_min=0.0, hist_time_max=3000.0, hist_time_bins=128,
                     hist_risk_min=-3.0, hist_risk_max=3.0, hist_risk_bins=128, td_auc_time=1825.0)
#: The discrete-time follow-up's settings (module docstring): only the loss and its bins differ.
DISCRETE_PROTOCOL = replace(PROTOCOL, survival_loss="discrete", time_bins=8, hist_risk_min=0.0, hist_risk_max=0.0)
SPLIT_FRACS = (0.60, 0.15, 0.25)


def _split(event: np.ndarray, seed: int) -> np.ndarray:
    """'train'/'val'/'test' for one site's patients, stratified by event."""
    idx = np.arange(len(event))
    train_val, test = train_test_split(idx, test_size=SPLIT_FRACS[2], stratify=event, random_state=seed)
    val_share = SPLIT_FRACS[1] / (SPLIT_FRACS[0] + SPLIT_FRACS[1])
    train, val = train_test_split(train_val, test_size=val_share, stratify=event[train_val], random_state=seed)
    out = np.empty(len(event), dtype=object)
    out[train], out[val], out[test] = "train", "val", "test"
    return out


def _write_labels(directory: Path, ids: list[str], t: np.ndarray, e: np.ndarray, split: np.ndarray) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    with (directory / "labels.csv").open("w", newline="") as f:
        csv.writer(f).writerows([("slide_id", "time", "event", "split"),
                                 *((p, f"{ti:g}", int(ei), s) for p, ti, ei, s in zip(ids, t, e, split, strict=True))])


def write_gbsg2_cohorts(work: Path, split_seed: int = 0) -> dict[str, Any]:
    """``work/federated/grade_{I,II,III}``, ``work/pooled/all`` and ``work/local_<g>/grade_<g>`` (links to the
    federated site): cohort directories of one-instance HDF5 bags; returns the sites' sizes."""
    raw, _ = load_gbsg2()
    x, t, e, _ = gbsg2()  # same row order as raw
    grade = raw["tgrade"].astype(str).to_numpy()
    ids = np.array([f"gbsg2_p{i:03d}" for i in range(len(t))], dtype=object)
    split = np.empty(len(t), dtype=object)
    for g in GRADES:
        rows = np.flatnonzero(grade == g)
        split[rows] = _split(e[rows], split_seed)
    fit_rows = split != "test"
    mean, std = x[fit_rows].mean(0), x[fit_rows].std(0)
    std[std == 0] = 1.0
    xs = (x - mean) / std
    sizes, pooled = {}, work / "pooled" / "all" / "features"
    pooled.mkdir(parents=True, exist_ok=True)
    for g in GRADES:
        rows = np.flatnonzero(grade == g)
        site = work / "federated" / f"grade_{g}"
        for pid, row in zip(ids[rows], xs[rows], strict=True):
            with FeatureWriter(site / "features" / f"{pid}.h5", xs.shape[1], feature_attrs("gbsg2", pid)) as w:
                w.append(np.zeros((1, 2), dtype=np.int64), row[None, :].astype(np.float32))
                w.commit()
            if not (pooled / f"{pid}.h5").exists():  # the pooled site reads the same files
                (pooled / f"{pid}.h5").symlink_to((site / "features" / f"{pid}.h5").resolve())
        _write_labels(site, list(ids[rows]), t[rows], e[rows], split[rows])
        local = work / f"local_{g}"
        local.mkdir(parents=True, exist_ok=True)
        if not (local / f"grade_{g}").exists():
            (local / f"grade_{g}").symlink_to((work / "federated" / f"grade_{g}").resolve())
        sizes[g] = {s: int((split[rows] == s).sum()) for s in ("train", "val", "test")} | {
            "events": int(e[rows].sum())}
    _write_labels(work / "pooled" / "all", list(ids), t, e, split)
    return sizes


def _run(cohort: Path, cfg: FedConfig) -> dict[str, Any]:
    """One arm: the real ClientApp/ServerApp loop over the cohort's sites; its history and best round."""
    n = len(discover_cohort(cohort))
    cfg = replace(cfg, min_available_nodes=n, min_train_nodes=n, min_evaluate_nodes=n)
    grid = InlineGrid(make_client_app(cohort), [{"partition-id": i} for i in range(n)])
    start = time.perf_counter()
    result = run_server(grid, cfg)
    best = result.history[result.best_round - 1]
    return {"best_round": result.best_round, "seconds": round(time.perf_counter() - start, 1),
            # from the summed histograms, on the arm's own test split (a local arm: its site's patients only)
            "server_own_test_c_index": best.get("test-c-index"), "server_own_test_td_auc": best.get("test-td-auc")}


def pooled_test_c_index(checkpoint: Path, federated: Path, cfg: FedConfig) -> tuple[float, int, int]:
    """Harrell's C of a checkpoint on every site's test patients, pooled: (C, patients, events)."""
    model, _ = load_checkpoint(checkpoint)
    t, e, r = [], [], []
    for site in discover_cohort(federated):
        data = load_site(site, classes=tuple(cfg.outputs(())), label_col=cfg.label_col, val_frac=cfg.val_frac,
                         test_frac=cfg.test_frac, seed=cfg.seed, max_instances=None,
                         survival=(cfg.time_col, cfg.event_col))
        preds = predict_risk(model, data.test, cfg.survival_loss, batch_size=64)
        t.append(preds.time), e.append(preds.event), r.append(preds.risk)
    tt, ee = np.concatenate(t), np.concatenate(e)
    return harrell_c(tt, ee, np.concatenate(r)), len(tt), int(ee.sum())


def run_gbsg2_federated(work: Path, seeds: tuple[int, ...] = (0, 1, 2), rounds: int | None = None,
                        protocol: FedConfig = PROTOCOL) -> dict[str, Any]:
    """Every arm for every seed (see the module docstring); C-index per arm and seed, their means, the goal."""
    os.environ.setdefault(LOG_LEVEL_ENV, "WARNING")  # a line per round x 5 arms x seeds would drown the result
    logging.getLogger("flwr").setLevel(logging.WARNING)
    work = Path(work)
    sizes = write_gbsg2_cohorts(work)
    arms = {"pooled": work / "pooled", **{f"local_{g}": work / f"local_{g}" for g in GRADES},
            "federated": work / "federated"}
    out: dict[str, Any] = {"dataset": "gbsg2", "sites": sizes, "protocol": protocol.to_run_config(),
                           "seeds": list(seeds), "arms": {a: [] for a in arms}}
    if rounds is not None:
        out["protocol"]["num-server-rounds"] = rounds
    for seed in seeds:
        for arm, cohort in arms.items():
            runs = "runs" if protocol.survival_loss == "cox" else f"runs-{protocol.survival_loss}"
            cfg = replace(protocol, seed=seed, out_dir=str(work / runs / f"{arm}-seed{seed}"),
                          num_server_rounds=rounds or protocol.num_server_rounds)
            run = _run(cohort, cfg)
            c, n, events = pooled_test_c_index(Path(cfg.out_dir) / "best.pt", arms["federated"], cfg)
            out["arms"][arm].append({"seed": seed, "test_c_index": c, **run})
            out["test_patients"], out["test_events"] = n, events
    means = {arm: float(np.mean([r["test_c_index"] for r in runs])) for arm, runs in out["arms"].items()}
    out["mean_test_c_index"] = means
    local_best = max(means[f"local_{g}"] for g in GRADES)
    out["goal"] = {"federated >= pooled - 0.02": means["federated"] >= means["pooled"] - 0.02,
                   "federated >= every site alone": means["federated"] >= local_best}
    return out
