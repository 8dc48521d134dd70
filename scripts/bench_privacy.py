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
import dataclasses
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_federated import (
    DATASETS,
    ENGINES,
    SKEWS,
    Cohort,
    Protocol,
    Results,
    build_cohort,
    format_cell,
    mean_std,
    score,
    synthetic_cohort,
)

from models import MILConfig
from models.config import INPUT_NORMS
from wsi_fl.federation.config import FedConfig

GOAL_DROP = 0.05  # at epsilon 8


def run(cohort: Cohort, out: Path, proto: Protocol, dp: dict) -> tuple[float, float | None]:
    """(test AUC, epsilon spent) of FedAvg on ``cohort`` with the DP settings ``dp`` (empty: none)."""
    base = proto.fed_config("fedavg", cohort.seed, len(cohort.sites), out)
    cfg = FedConfig(**{**dataclasses.asdict(base), **dp})
    ENGINES["inline"](cohort.root, len(cohort.sites), cfg)
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    return score(out / "last.pt", cohort, proto)[0], last.get("dp-epsilon")


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
    sgd = {"dp_batch_size": args.batch_size} if args.mode == "slide-dpsgd" else {}
    if args.dp_lr is not None:
        sgd["lr"] = args.dp_lr
    settings = {"no DP": {}} | {f"eps {e:g}": {"dp": args.mode, "dp_epsilon": e, "dp_delta": args.delta,
                                              "dp_clipping_norm": args.clip, **sgd} for e in args.epsilons}
    label = (f"{args.mode} clip {args.clip}" + (f" batch {args.batch_size}" if args.mode == "slide-dpsgd" else "")
             + (f" lr {args.dp_lr:g}" if args.dp_lr is not None else ""))
    combos = [(d, s) for d in args.datasets for s in args.skews] + ([("synthetic", "as-is")] if args.synthetic else [])
    for dataset, skew in combos:
        for seed in args.seeds:
            cohort = (synthetic_cohort(args.synthetic, seed) if dataset == "synthetic"
                      else build_cohort(work, args.data / f"{dataset}.csv", dataset, skew, seed))
            for name, dp in settings.items():
                key = {"protocol": proto.fingerprint(), "dataset": dataset, "skew": skew, "seed": seed,
                       "model": f"{name} {label}"}
                if results.has(**key):
                    continue
                start = time.perf_counter()
                out = work / "runs" / dataset / skew / f"seed{seed}" / name.replace(" ", "")
                auc, eps = run(cohort, out, proto, dp)
                results.append({**key, "kind": "run", "auc": auc, "epsilon": eps,
                                "seconds": round(time.perf_counter() - start, 1)})
                print(f"[{dataset}/{skew} seed {seed}] {name:<8} test AUC {auc:.3f}"
                      + (f"  epsilon spent {eps:.3f}" if eps is not None else ""), flush=True)
    print(f"\nFedAvg test AUC, mean ± std over seeds {args.seeds}; {args.epochs} rounds; DP {label}, "
          f"delta {args.delta:g}; drop = no DP - DP (goal at epsilon 8: <= {GOAL_DROP})")
    print(f"{'dataset/skew':<18}" + "".join(f"{n:>22}" for n in settings) + f"{'drop at eps 8':>16}")
    for dataset, skew in combos:
        cols = {}
        for name in settings:
            model = f"{name} {label}"
            cols[name] = [r["auc"] for r in results.rows if r.get("dataset") == dataset and r.get("skew") == skew
                          and r.get("model") == model and r.get("seed") in args.seeds
                          and r.get("protocol") == proto.fingerprint()]
        drop = (mean_std(cols["no DP"])[0] - mean_std(cols["eps 8"])[0]) if "eps 8" in cols else float("nan")
        print(f"{dataset + '/' + skew:<18}" + "".join(f"{format_cell(v, len(args.seeds)):>22}" for v in cols.values())
              + f"{drop:>16.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
