"""GBSG2: a linear Cox model trained with wsi-fl's Cox loss vs lifelines' penalised CoxPHFitter, same 10 folds.

Prints one JSON object (wsi_fl.benchmarks.survival.run_gbsg2_benchmark). Usage:
    python scripts/bench_survival.py [--folds 10] [--penalizer 0.01] [--seed 0]
"""

from __future__ import annotations

import argparse
import json

from wsi_fl.benchmarks.survival import run_gbsg2_benchmark


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--folds", type=int, default=10)
    ap.add_argument("--penalizer", type=float, default=0.01)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    print(json.dumps(run_gbsg2_benchmark(args.folds, args.penalizer, args.seed)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
