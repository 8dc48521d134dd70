"""Small real HDF5 bag sites for training tests: ``<root>/<site>/features/*.h5`` and ``<root>/<site>/labels.csv``.

That is also the cohort layout :func:`wsi_fl.site.data.discover_cohort` reads, so
the same sites serve local, pooled and federated tests.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from preprocessing.h5format import REQUIRED_ATTRS, FeatureWriter
from wsi_fl.mil.fit import Site

DIM = 16


def _attrs(slide_id: str, **over) -> dict:
    attrs = {k: "x" for k in REQUIRED_ATTRS if k not in ("feature_dim", "feature_dtype")}
    attrs.update(slide_id=slide_id, encoder="enc-a", weights="random-init", target_mpp=0.5, tile_size=224,
                 tile_size_level0=448.0, mpp=0.25, source_file=f"{slide_id}.tiff")
    attrs.update(over)
    return attrs


def make_site(root: Path, name: str, n_slides: int, seed: int, *, shift: float = 2.0, **attr_over) -> Site:
    """Bags of 20-40 instances; in positive bags a quarter of the instances are shifted on 4 features."""
    rng = np.random.default_rng(seed)
    feats_dir, rows = root / name / "features", []
    for i in range(n_slides):
        slide_id, label = f"{name}_s{i:02d}", i % 2
        n = int(rng.integers(20, 40))
        x = rng.standard_normal((n, DIM)).astype(np.float32)
        if label:
            x[: n // 4, :4] += shift
        coords = np.stack([np.arange(n) * 448, np.zeros(n)], axis=1)
        with FeatureWriter(feats_dir / f"{slide_id}.h5", DIM, _attrs(slide_id, **attr_over)) as w:
            w.append(coords, x)
            w.commit()
        rows.append((slide_id, label, f"p{i // 2 if i < 4 else i}"))  # the first patients have two slides
    labels = root / name / "labels.csv"
    with labels.open("w", newline="") as f:
        csv.writer(f).writerows([("slide_id", "label", "patient_id"), *rows])
    return Site(name, feats_dir, labels)


def make_cohort(root: Path, sizes: tuple[int, ...] = (10, 12, 14), seed: int = 0, **kw) -> list[Site]:
    """One site per size (``site_1``...), each with its own seed; returns the sites in cohort order."""
    return [make_site(root, f"site_{k + 1}", n, seed + 101 * k, **kw) for k, n in enumerate(sizes)]


def grid_for(cohort: Path, faults=None):
    """An in-process federation of the cohort's first three sites (simulation partitions 0-2)."""
    from wsi_fl.engines.inline import InlineGrid
    from wsi_fl.site.app import make_client_app

    return InlineGrid(make_client_app(cohort), [{"partition-id": i} for i in range(3)], faults=faults)


def history(out: Path) -> list[dict]:
    """The rows of a federated run's ``metrics.jsonl``."""
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
