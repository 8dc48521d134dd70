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
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from models import MILConfig, create_model
from preprocessing.h5format import REQUIRED_ATTRS, FeatureWriter
from wsi_fl.mil.data import BagRecord, FeatureBagDataset
from wsi_fl.mil.training import TrainConfig, train_model

DIM = 1024


def write_bags(root: Path, n_bags: int, n_instances: int) -> list[BagRecord]:
    rng = np.random.default_rng(0)
    records = []
    for i in range(n_bags):
        slide_id = f"bag{i:03d}"
        attrs = {k: "bench" for k in REQUIRED_ATTRS if k not in ("feature_dim", "feature_dtype")}
        attrs.update(slide_id=slide_id, target_mpp=0.5, tile_size=224)
        with FeatureWriter(root / f"{slide_id}.h5", DIM, attrs) as w:
            for start in range(0, n_instances, 4096):
                n = min(4096, n_instances - start)
                w.append(np.zeros((n, 2)), rng.standard_normal((n, DIM), dtype=np.float32))
            w.commit()
        records.append(BagRecord(slide_id, str(i % 2), i % 2, slide_id, None))
    return records


def raw_rate(n_instances: int, steps: int) -> float:
    torch.manual_seed(0)
    model = create_model(MILConfig(in_dim=DIM)).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x, y = torch.randn(1, n_instances, DIM), torch.tensor([1])
    loss_fn = torch.nn.CrossEntropyLoss()

    def step() -> None:
        loss = loss_fn(model(x, labels=y).logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()  # warm-up
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return steps / (time.perf_counter() - start)


def train_rate(root: Path, records: list[BagRecord], epochs: int) -> float:
    torch.manual_seed(0)
    ds = FeatureBagDataset(records, root)
    model = create_model(MILConfig(in_dim=DIM))
    start = time.perf_counter()
    train_model(model, ds, None, TrainConfig(epochs=epochs, early_stopping="none", class_weighting=False))
    return len(records) * epochs / (time.perf_counter() - start)


def big_bag(n_instances: int) -> dict:
    """Child process: one bag of ``n_instances`` from HDF5, one epoch; peak RSS."""
    with tempfile.TemporaryDirectory() as tmp:
        records = write_bags(Path(tmp), 1, n_instances)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        start = time.perf_counter()
        train_rate(Path(tmp), records, 1)
        seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"instances": n_instances, "seconds": round(seconds, 1), "peak_rss_mb": round(peak / 1024),
            "rss_before_training_mb": round(before / 1024), "bag_mb": round(n_instances * DIM * 4 / 2**20)}


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
