"""MIL training throughput: bags/s of the real training loop over HDF5 bags against the model's raw rate.

Why measured this way: training reads every bag from its HDF5 feature file each
epoch, so the loop's rate is bounded by the model's own forward + backward rate
(:func:`raw_rate`, on an in-memory tensor) and the question is how much loading
costs on top (:func:`train_rate`; goal: train ÷ raw ≥ 0.8). :func:`big_bag`
trains one very large bag (100,000 instances by default, a whole resection at
20×) to show its peak memory stays near the bag's own size; it is meant to run
in a fresh process, so the peak RSS is its own.
"""

from __future__ import annotations

import resource
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
    """``n_bags`` random bags of ``n_instances`` × :data:`DIM` float32 under ``root``, labels alternating."""
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
    """Optimiser steps/s of the default model on one in-memory bag: forward, loss, backward, step."""
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
    """Bags/s of :func:`~wsi_fl.mil.training.train_model` over the files, loading included."""
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
