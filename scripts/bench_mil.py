"""The classic MIL benchmarks (Musk1, Musk2, Fox, Tiger) against Ilse et al. (2018), one configuration for all.

Runs ``wsi-fl mil-benchmark`` (10-fold CV, 5 repeats by default) for the
attention, gated-attention, Chowder and TransMIL heads on every bag table, two processes at a
time with one thread each, and prints each result and a table beside the
published means (Ilse et al. report attention and gated attention only). ``--tune`` runs the nested-CV
protocol instead (``wsi-fl mil-benchmark --tune``; about 12 times the CPU time).

    python scripts/bench_mil.py [--data ../shared/data/mil] [--repeats 5] [--jobs 2] [--tune]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

#: Ilse, Tomczak & Welling 2018, Table 1 (10-fold CV accuracy, as commonly quoted).
PUBLISHED = {
    "attention": {"musk1": 0.892, "musk2": 0.858, "fox": 0.615, "tiger": 0.839},
    "gated_attention": {"musk1": 0.900, "musk2": 0.863, "fox": 0.603, "tiger": 0.845},
}


def run(csv: Path, model: str, folds: int, repeats: int, tune: bool = False) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "wsi_fl", "mil-benchmark", "--csv", str(csv), "--folds", str(folds),
           "--repeats", str(repeats), "--model", model, "--quiet", *(["--tune"] if tune else [])]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"{csv.name} {model}: {out.stderr.strip()}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    print(json.dumps(result), flush=True)
    return result


def main() -> int:
    root = Path(__file__).resolve().parent.parent
    default_data = Path(os.environ.get("WSI_FL_TESTDATA", root.parent / "shared" / "data")) / "mil"
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=default_data)
    ap.add_argument("--folds", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--datasets", nargs="+", default=["musk1", "musk2", "fox", "tiger"])
    ap.add_argument("--models", nargs="+", default=[*PUBLISHED, "chowder", "transmil"])
    ap.add_argument("--tune", action="store_true", help="nested-CV tuning per outer fold (wsi_fl.mil.tuning)")
    args = ap.parse_args()
    jobs = [(d, m) for m in args.models for d in args.datasets]
    with ThreadPoolExecutor(args.jobs) as pool:
        results = list(pool.map(lambda j: run(args.data / f"{j[0]}.csv", j[1], args.folds, args.repeats,
                                                     args.tune), jobs))
    print(f"\n{'model':<17}{'dataset':<8}{'accuracy':>18}{'published':>11}{'diff':>8}{'AUC':>16}")
    for (dataset, model), r in zip(jobs, results, strict=True):
        ref = PUBLISHED.get(model, {}).get(dataset)
        diff = f"{r['accuracy_mean'] - ref:+.3f}" if ref else ""
        print(f"{model:<17}{dataset:<8}{r['accuracy_mean']:>10.3f} ± {r['accuracy_std']:.3f}"
              f"{ref or '':>11}{diff:>8}{r['auc_mean']:>9.3f} ± {r['auc_std']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
