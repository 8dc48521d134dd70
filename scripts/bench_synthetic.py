"""Validation on the synthetic cohort: held-out AUC of a pooled model, and whether attention finds the tumour.

Generates a three-site cohort, preprocesses every site with the real pipeline,
trains a pooled gated-attention model (patient-level train/val/test split) and
reports on the held-out slides:

* AUC (goal ≥ 0.95) with its bootstrap 95 % CI;
* for each positive held-out slide, the fraction of its 10 highest-attention
  tiles that are planted tumour-like tiles (a tile counts as planted when more
  than half of it lies inside a rectangle of ``planted.csv``); goal: mean ≥ 0.8.

    python scripts/bench_synthetic.py [--slides-per-site 14] [--encoder resnet18_trunc] [--out DIR]
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import tempfile
from pathlib import Path

import h5py
import numpy as np

from preprocessing.pipeline import PreprocessConfig, discover_slides, run_preprocess
from preprocessing.synth import generate_cohort
from wsi_fl.mil.data import FeatureBagDataset, read_labels
from wsi_fl.mil.fit import Site, fit
from wsi_fl.mil.training import TrainConfig, predict

TOP = 10


def planted_boxes(site_dir: Path) -> dict[str, list[tuple[int, int, int, int]]]:
    boxes: dict[str, list[tuple[int, int, int, int]]] = {}
    with open(site_dir / "planted.csv") as f:
        for r in csv.DictReader(f):
            boxes.setdefault(r["slide_id"], []).append((int(r["x"]), int(r["y"]), int(r["width"]), int(r["height"])))
    return boxes


def planted_fraction(coords: np.ndarray, tile: float, boxes: list[tuple[int, int, int, int]]) -> np.ndarray:
    """Per tile: True when more than half of its area lies inside one planted rectangle."""
    inside = np.zeros(len(coords), bool)
    for x, y, w, h in boxes:
        ox = np.clip(np.minimum(coords[:, 0] + tile, x + w) - np.maximum(coords[:, 0], x), 0, None)
        oy = np.clip(np.minimum(coords[:, 1] + tile, y + h) - np.maximum(coords[:, 1], y), 0, None)
        inside |= ox * oy > 0.5 * tile * tile
    return inside


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slides-per-site", type=int, default=14)
    ap.add_argument("--encoder", default="resnet18_trunc")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, help="keep outputs here (default: a temporary directory)")
    args = ap.parse_args()
    from preprocessing.runtime import ensure_fast_allocator

    ensure_fast_allocator()
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp)
        cohort = generate_cohort(out / "cohort", sites=3, slides_per_site=args.slides_per_site, seed=args.seed,
                                 progress=False)
        sites = []
        for s in cohort:
            cfg = PreprocessConfig(out_dir=out / "features" / s.site, encoder=args.encoder, random_init=True,
                                   progress=False)
            results = run_preprocess(discover_slides([s.slides_dir]), cfg)
            assert all(r.status == "ok" for r in results), [r.error for r in results if r.status != "ok"]
            sites.append(Site(s.site, cfg.out_dir / "features", s.labels_csv))
        result = fit(sites, out / "model", train=TrainConfig(epochs=40, seed=args.seed), test_frac=0.3,
                     progress=False)

        from models.checkpoint import load_checkpoint

        model, ckpt = load_checkpoint(result.checkpoint)
        with open(out / "model" / "splits.csv") as f:
            test = {r["slide_id"]: r["site"] for r in csv.DictReader(f) if r["split"] == "test"}
        fractions = []
        for site in sites:
            table = read_labels(site.labels, classes=ckpt.classes)
            records = [r for r in table.records if r.slide_id in test and r.label == ckpt.classes[-1]]
            if not records:
                continue
            ds = FeatureBagDataset(records, site.features_dir)
            preds = predict(model, ds, keep_attention=True)
            boxes = planted_boxes(site.labels.parent)
            for rec, path, att in zip(records, ds.paths, preds.attention, strict=True):
                with h5py.File(path) as f:
                    coords, tile = f["coords"][()], float(f.attrs["tile_size_level0"])
                top = np.argsort(-att)[:TOP]
                fractions.append(float(planted_fraction(coords[top], tile, boxes[rec.slide_id]).mean()))
        m = result.test_metrics or {}
        print(json.dumps({
            "slides": sum(s.n_slides for s in cohort), "encoder": args.encoder, "splits": result.split_sizes,
            "test_auc": m.get("auc"), "test_auc_ci95": m.get("auc_ci95"), "test_accuracy": m.get("accuracy"),
            "goal_auc": ">= 0.95", "auc_met": (m.get("auc") or 0) >= 0.95,
            "positive_test_slides": len(fractions),
            "top10_planted_fraction_mean": round(float(np.mean(fractions)), 3) if fractions else None,
            "top10_planted_fraction_per_slide": [round(f, 2) for f in fractions],
            "goal_attention": ">= 0.8", "attention_met": bool(fractions) and float(np.mean(fractions)) >= 0.8,
        }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
