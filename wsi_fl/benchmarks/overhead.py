"""What federation costs beyond accuracy: time against pooled training, and bytes on the wire per round.

Why these figures: a hospital weighs a federation by its wall time and its
traffic, and both are easy to get wrong unseen (a Ray start-up that dwarfs the
training, a wire format that doubles the model). On one cohort and seed, FedAvg
at the protocol's epochs is timed against pooled :func:`wsi_fl.mil.fit.fit` on
the simulation engine (Ray start-up included; goal: simulation ÷ pooled ≤ 1.5),
the inline engine and, on request, the deployment engine (processes on
loopback; its test AUC must match the simulation's within 0.01). The bytes each
site sent per round are compared with the model's float32 size (4 × parameters;
goal ≤ 1.05×), and a float16-transport run gives half the bytes (goal ½) at a
test-AUC loss of at most 0.01. The report is also appended to the results file
as one ``"kind": "overhead"`` row.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from models.checkpoint import load_checkpoint
from wsi_fl.benchmarks.cohorts import Cohort, describe
from wsi_fl.benchmarks.federated import Protocol, run_deployment, run_inline, run_simulation, score, train_fit
from wsi_fl.benchmarks.results import Results


def bytes_per_round(out: Path) -> list[float]:
    """Bytes each client sent, per round, from a run's ``metrics.jsonl``."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r["bytes-per-client"] for r in rows if "bytes-per-client" in r]


def round_seconds(out: Path) -> float:
    """Seconds spent in the rounds themselves (engine start-up and shut-down excluded)."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return sum(r.get("seconds", 0.0) for r in rows)


def timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def overhead(cohort: Cohort, work: Path, proto: Protocol, results: Results, deployment: bool) -> None:
    """Time and bytes of FedAvg on ``cohort`` against pooled training; printed and appended to ``results``."""
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
