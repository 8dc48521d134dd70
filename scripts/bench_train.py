"""MIL training throughput from HDF5 bags vs the model's raw forward+backward rate, and a 100k-instance bag.

(a) raw: forward + loss + backward + optimiser step of the default gated-attention
    model on an in-memory (1, N, 1024) tensor, N = 10,000 (bags/s).
(b) train: :func:`wsi_fl.mil.training.train_model` over real HDF5 feature files of
    10,000 × 1024 (written with the project's FeatureWriter), several epochs,
    loading included (bags/s). Goal: b/a ≥ 0.8.
(c) a single 100,000 × 1024 bag trained for one epoch in a fresh process: peak RSS.

    python scripts/bench_train.py [--bags 6] [--epochs 3] [--instances 10000]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from wsi_fl.benchmarks.throughput import DIM, big_bag, raw_rate, train_rate, write_bags


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bags", type=int, default=6)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--instances", type=int, default=10_000)
    ap.add_argument("--big", type=int, default=100_000, help="instances of the single large bag (0: skip)")
    ap.add_argument("--child-big", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child_big:
        print(json.dumps(big_bag(args.child_big)))
        return 0
    from preprocessing.runtime import ensure_fast_allocator

    ensure_fast_allocator()
    with tempfile.TemporaryDirectory() as tmp:
        records = write_bags(Path(tmp), args.bags, args.instances)
        a = raw_rate(args.instances, args.bags * args.epochs)
        b = train_rate(Path(tmp), records, args.epochs)
    print(json.dumps({"instances_per_bag": args.instances, "dim": DIM, "threads": torch.get_num_threads(),
                      "raw_bags_per_s": round(a, 3), "train_bags_per_s": round(b, 3), "ratio": round(b / a, 3),
                      "goal": ">= 0.8", "met": b / a >= 0.8}), flush=True)
    if args.big:
        out = subprocess.run([sys.executable, __file__, "--child-big", str(args.big)], capture_output=True,
                             text=True, check=True)
        print(out.stdout.strip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
