"""What differential privacy costs: federated test AUC at ε = 1, 3, 8 (δ = 1e-5) against the same run without DP.

Uses the federated benchmark's protocol and three-site cohorts
(``scripts/bench_federated.py``: the same partitions, seeds, epochs and
scoring on the union of the sites' held-out slides). Each seed runs FedAvg
``--epochs`` rounds of one local epoch without DP, then with central DP
(``--mode``, default client-side fixed clipping at ``--clip``) calibrated to
each target ε over those rounds. With central modes the privacy unit is a site
(client-level DP, :mod:`wsi_fl.privacy.central`); with ``--mode slide-dpsgd`` it is a
training slide, each site running DP-SGD with per-bag clipping at ``--clip`` and
``--batch-size`` expected bags per step (:mod:`wsi_fl.privacy.dpsgd`). Prints mean ± std
of the test AUC over seeds, the drop from no DP, and the ε reported after the
last round.

Examples::

    python scripts/bench_privacy.py --datasets musk1 --skews label --seeds 0 1 2 3 4
    python scripts/bench_privacy.py --datasets --synthetic /path/to/cohort --seeds 0 1 2
    python scripts/bench_privacy.py --mode slide-dpsgd --clip 1.0 --batch-size 8 --datasets fox --seeds 0 1 2
    # DP-SGD's noise grows with the number of weights: a small model on per-slide standardised features
    python scripts/bench_privacy.py --mode slide-dpsgd --clip 1.0 --batch-size 16 --dp-lr 5e-3 \
        --hidden-dim 16 --attn-dim 8 --input-norm slide --datasets --synthetic COHORT --seeds 0 1 2 3 4
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
from pathlib import Path

import torch

from models import MILConfig
from models.config import INPUT_NORMS
from wsi_fl.benchmarks.cohorts import DATASETS, SKEWS, build_cohort, synthetic_cohort
from wsi_fl.benchmarks.federated import Protocol
from wsi_fl.benchmarks.privacy import DPSweep, print_table, run_cohort
from wsi_fl.benchmarks.results import Results


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_data = Path(os.environ.get("WSI_FL_TESTDATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
    ap.add_argument("--data", type=Path, default=default_data / "mil")
    ap.add_argument("--datasets", nargs="*", default=["musk1"], choices=DATASETS)
    ap.add_argument("--skews", nargs="+", default=["label"], choices=SKEWS)
    ap.add_argument("--synthetic", type=Path, help="an existing cohort directory, used as is")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    ap.add_argument("--epsilons", nargs="+", type=float, default=[1.0, 3.0, 8.0])
    ap.add_argument("--delta", type=float, default=1e-5)
    ap.add_argument("--mode", default="client-fixed", help="FedConfig dp mode")
    ap.add_argument("--clip", type=float, default=0.1, help="clipping norm of a site's update (of a bag's gradient "
                                                            "with slide-dpsgd)")
    ap.add_argument("--batch-size", type=int, default=8, help="slide-dpsgd: expected bags per step")
    ap.add_argument("--model", default=MILConfig.model, help="registered MIL model, with and without DP")
    ap.add_argument("--hidden-dim", type=int, default=MILConfig.hidden_dim, help="model width, with and without DP")
    ap.add_argument("--input-norm", default=MILConfig.input_norm, choices=INPUT_NORMS,
                    help="slide: standardise features per slide (models.base.standardize_within_bag)")
    ap.add_argument("--attn-dim", type=int, default=MILConfig.attn_dim, help="attention width, with and without DP")
    ap.add_argument("--lr", type=float, default=Protocol.lr, help="local learning rate")
    ap.add_argument("--dp-lr", type=float, help="local learning rate under DP [--lr]; DP-SGD takes one step per "
                                                "batch of --batch-size bags, not per bag, so it needs a larger one")
    ap.add_argument("--epochs", type=int, default=Protocol.epochs, help="rounds (one local epoch each)")
    ap.add_argument("--work", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(1)
    import flwr.common  # noqa: F401  (sets Flower's logger to DEBUG on import: quieten it afterwards)

    logging.getLogger("flwr").setLevel(logging.WARNING)
    work = (args.work or Path(tempfile.mkdtemp(prefix="benchdp-"))).resolve()
    results = Results(work / "results.jsonl")
    proto = Protocol(epochs=args.epochs, lr=args.lr,
                     model=MILConfig(model=args.model, hidden_dim=args.hidden_dim, attn_dim=args.attn_dim,
                                     input_norm=args.input_norm))
    sweep = DPSweep(mode=args.mode, clip=args.clip, batch_size=args.batch_size, dp_lr=args.dp_lr,
                    epsilons=tuple(args.epsilons), delta=args.delta)
    combos = [(d, s) for d in args.datasets for s in args.skews] + ([("synthetic", "as-is")] if args.synthetic else [])
    for dataset, skew in combos:
        for seed in args.seeds:
            cohort = (synthetic_cohort(args.synthetic, seed) if dataset == "synthetic"
                      else build_cohort(work, args.data / f"{dataset}.csv", dataset, skew, seed))
            run_cohort(cohort, results, work / "runs", proto, sweep)
    print_table(results, proto, sweep, combos, args.seeds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
