"""What stain normalisation does to an unseen hospital: the main job's cohort, once per stain arm and seed.

The plan (arms, seeds, measure, decision rule) is fixed in ``docs/stain-normalisation.md``. Each
(seed, arm) runs the main job's pipeline (:mod:`wsi_fl.demo`) with that arm's preprocessing: the
``realistic`` cohort at the seed, preprocessed with the arm's stain settings, pooled / local / FedAvg
models scored on the same held-out slides, and the leave-one-site-out models scored on every slide of the
site they never saw. Federation runs in process (``engine="inline"``: the same ServerApp/ClientApp as the
simulation engine, without Ray's start-up). Results go to ``<work>/results.jsonl``, one line per
(seed, arm), and a rerun with ``--resume`` skips what is there.

Primary measure: the unseen-site AUC, averaged over the held-out sites and the two modes (pooled, FedAvg),
then over seeds. The script prints it per arm, its difference from ``none``, and the arm the rule picks.

    python scripts/bench_stain.py --seeds 0 1 2 --arms none macenko reinhard hed --work /tmp/stain
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path

ARMS = ("none", "macenko", "reinhard", "hed")
HED_SIGMA = 0.05  # the plan's jitter strength (Tellez et al.'s "light" HED augmentation range)
MARGIN = 0.02  # the decision rule: an arm replaces "none" only if it beats it by this much


def stain_params(arm: str):
    from preprocessing.params import StainParams

    if arm == "hed":
        return StainParams(method="none", hed_jitter=HED_SIGMA, seed=0)
    return StainParams(method=arm)


def run_one(work: Path, seed: int, arm: str) -> dict:
    """One (seed, arm): the main job's pipeline with the arm's stain settings; returns its results line."""
    from wsi_fl.demo import Timer, compare_demo_models, run_demo, train_demo_model, unseen_demo

    out = work / f"seed{seed}-{arm}"
    if out.exists():  # an interrupted run: start it again from nothing
        shutil.rmtree(out)
    timer = Timer()
    started = time.perf_counter()
    reports = run_demo(out, seed=seed, progress=False, timer=timer,
                       preprocess_options={"stain": stain_params(arm)})
    failed = [r.site for r in reports if r.failed]
    if failed:
        raise RuntimeError(f"{out}: preprocessing failed at {', '.join(failed)}")
    train_demo_model(out, reports, seed=seed, progress=False, timer=timer)
    scored = compare_demo_models(out, reports, seed=seed, progress=False, engine="inline", timer=timer)
    unseen = unseen_demo(out, reports, seed=seed, progress=False, timer=timer)
    return {
        "seed": seed, "arm": arm, "seconds": round(time.perf_counter() - started, 1),
        "seen": {s.name: s.auc for s in scored},
        "unseen": [{"held_out": u.held_out, "mode": u.mode, "auc": u.auc, "n": u.n_slides,
                    "n_positive": u.n_positive} for u in unseen],
    }


def unseen_mean(row: dict) -> float:
    return statistics.fmean(u["auc"] for u in row["unseen"])


def summarise(rows: list[dict], arms: list[str]) -> str:
    """Per arm: primary measure per seed and its mean, per held-out site and mode, seen AUCs; the rule's pick."""
    by_arm = {a: sorted((r for r in rows if r["arm"] == a), key=lambda r: r["seed"]) for a in arms}
    lines = ["unseen-site AUC (mean of held-out sites x {pooled, FedAvg}) per seed, and its mean over seeds:"]
    primary = {}
    for arm, rs in by_arm.items():
        if not rs:
            continue
        per_seed = [unseen_mean(r) for r in rs]
        primary[arm] = statistics.fmean(per_seed)
        seeds = "  ".join(f"s{r['seed']} {v:.3f}" for r, v in zip(rs, per_seed, strict=True))
        lines.append(f"  {arm:<9} {primary[arm]:.3f}   ({seeds})")
    lines.append("per held-out site, pooled / FedAvg, mean over seeds:")
    for arm, rs in by_arm.items():
        cells = {}
        for r in rs:
            for u in r["unseen"]:
                cells.setdefault((u["held_out"], u["mode"]), []).append(u["auc"])
        sites = sorted({k[0] for k in cells})
        parts = [f"{s} {statistics.fmean(cells[(s, 'pooled')]):.3f} / {statistics.fmean(cells[(s, 'federated')]):.3f}"
                 for s in sites if (s, "pooled") in cells and (s, "federated") in cells]
        if parts:
            lines.append(f"  {arm:<9} " + "   ".join(parts))
    lines.append("seen held-out AUC, mean over seeds (pooled / FedAvg / best local per seed):")
    for arm, rs in by_arm.items():
        if not rs:
            continue
        pooled = statistics.fmean(r["seen"]["pooled"] for r in rs)
        fed = statistics.fmean(r["seen"]["federated (FedAvg)"] for r in rs)
        best = statistics.fmean(max(v for k, v in r["seen"].items() if k.startswith("local")) for r in rs)
        lines.append(f"  {arm:<9} {pooled:.3f} / {fed:.3f} / {best:.3f}")
    if "none" in primary:
        best_arm = max(primary, key=primary.get)
        diffs = "  ".join(f"{a} {v - primary['none']:+.3f}" for a, v in primary.items() if a != "none")
        pick = best_arm if primary[best_arm] - primary["none"] >= MARGIN else "none"
        lines.append(f"difference from none: {diffs}")
        lines.append(f"rule (beat none by >= {MARGIN}): default = {pick}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS))
    ap.add_argument("--work", type=Path, required=True, help="cohorts, models and results.jsonl")
    ap.add_argument("--resume", action="store_true", help="skip (seed, arm) pairs already in results.jsonl")
    ap.add_argument("--table", action="store_true", help="print the table from results.jsonl, run nothing")
    args = ap.parse_args(argv)

    from preprocessing.runtime import ensure_fast_allocator

    ensure_fast_allocator()
    args.work.mkdir(parents=True, exist_ok=True)
    results = args.work / "results.jsonl"
    rows = [json.loads(line) for line in results.read_text().splitlines() if line.strip()] if results.exists() else []
    done = {(r["seed"], r["arm"]) for r in rows}
    if not args.table:
        for seed in args.seeds:
            for arm in args.arms:
                if args.resume and (seed, arm) in done:
                    continue
                row = run_one(args.work, seed, arm)
                with results.open("a") as fh:
                    fh.write(json.dumps(row) + "\n")
                rows.append(row)
                print(f"seed {seed} {arm:<9} unseen mean {unseen_mean(row):.3f}  seen pooled "
                      f"{row['seen']['pooled']:.3f} fed {row['seen']['federated (FedAvg)']:.3f}  "
                      f"({row['seconds']:.0f} s)", flush=True)
    rows = [r for r in rows if r["seed"] in args.seeds and r["arm"] in args.arms]
    print(summarise(rows, args.arms))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
