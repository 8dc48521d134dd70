"""GBSG2 survival benchmarks; each prints one JSON object.

Default: a linear Cox model trained with wsi-fl's Cox loss vs lifelines' penalised CoxPHFitter, same 10 folds
(wsi_fl.benchmarks.survival.run_gbsg2_benchmark). ``--federated WORK``: GBSG2 split over three sites by tumour
grade, pooled vs each site alone vs federated, through the real ClientApp/ServerApp loop, under the protocol
pre-registered in wsi_fl.benchmarks.survival_federated (cohorts and runs written under WORK). ``--synthetic
WORK``: the synthetic survival cohort through preprocessing, pooled and federated training, under the protocol
pre-registered in wsi_fl.benchmarks.survival_synthetic. Usage:
    python scripts/bench_survival.py [--folds 10] [--penalizer 0.01] [--seed 0]
    python scripts/bench_survival.py --federated /tmp/gbsg2-fl [--seeds 0 1 2]
    python scripts/bench_survival.py --federated /tmp/gbsg2-fl --survival-loss discrete --seeds 3 4 5
    python scripts/bench_survival.py --synthetic /tmp/synsurv [--seeds 0 1 2]
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
    ap.add_argument("--synthetic", type=Path, metavar="WORK",
                    help="run the synthetic survival cohort end to end (slides, preprocessing, pooled and federated)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="--federated/--synthetic: seeds")
    ap.add_argument("--rounds", type=int, help="--federated/--synthetic: fewer rounds than the protocol's (smoke "
                                               "tests only)")
    ap.add_argument("--survival-loss", choices=("cox", "discrete"), default="cox",
                    help="--federated: the pre-registered Cox protocol or its discrete-time follow-up (seeds 3 4 5)")
    ap.add_argument("--slides-per-site", type=int, help="--synthetic: fewer slides than the protocol's (smoke only)")
    args = ap.parse_args()
    if args.synthetic is not None:
        import torch

        from wsi_fl.benchmarks.survival_synthetic import run_synthetic_survival

        torch.set_num_threads(1)
        print(json.dumps(run_synthetic_survival(args.synthetic, tuple(args.seeds), args.rounds,
                                                args.slides_per_site)))
        return 0
    if args.federated is not None:
        import torch

        from wsi_fl.benchmarks.survival_federated import DISCRETE_PROTOCOL, PROTOCOL, run_gbsg2_federated

        torch.set_num_threads(1)
        protocol = DISCRETE_PROTOCOL if args.survival_loss == "discrete" else PROTOCOL
        print(json.dumps(run_gbsg2_federated(args.federated, tuple(args.seeds), args.rounds, protocol)))
        return 0
    from wsi_fl.benchmarks.survival import run_gbsg2_benchmark

    print(json.dumps(run_gbsg2_benchmark(args.folds, args.penalizer, args.seed)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
