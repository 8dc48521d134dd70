"""GBSG2 survival benchmarks; each prints one JSON object.

Default: a linear Cox model trained with wsi-fl's Cox loss vs lifelines' penalised CoxPHFitter, same 10 folds
(wsi_fl.benchmarks.survival.run_gbsg2_benchmark). ``--federated WORK``: GBSG2 split over three sites by tumour
grade, pooled vs each site alone vs federated, through the real ClientApp/ServerApp loop, under the protocol
pre-registered in wsi_fl.benchmarks.survival_federated (cohorts and runs written under WORK). Usage:
    python scripts/bench_survival.py [--folds 10] [--penalizer 0.01] [--seed 0]
    python scripts/bench_survival.py --federated /tmp/gbsg2-fl [--seeds 0 1 2]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--folds", type=int, default=10)
    ap.add_argument("--penalizer", type=float, default=0.01)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--federated", type=Path, metavar="WORK", help="run the federated GBSG2 benchmark in WORK")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="--federated: model seeds")
    ap.add_argument("--rounds", type=int, help="--federated: fewer rounds than the protocol's (smoke tests only)")
    args = ap.parse_args()
    if args.federated is not None:
        import torch

        from wsi_fl.benchmarks.survival_federated import run_gbsg2_federated

        torch.set_num_threads(1)
        print(json.dumps(run_gbsg2_federated(args.federated, tuple(args.seeds), args.rounds)))
        return 0
    from wsi_fl.benchmarks.survival import run_gbsg2_benchmark

    print(json.dumps(run_gbsg2_benchmark(args.folds, args.penalizer, args.seed)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
