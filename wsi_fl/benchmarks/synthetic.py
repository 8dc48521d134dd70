"""Validation on the synthetic cohort: held-out AUC of a pooled model, and whether attention finds the tumour.

Why this check exists: the synthetic cohort (:mod:`preprocessing.synth`) plants
tumour-like rectangles in its positive slides and records them in each site's
``planted.csv``, so it is the one cohort where we know *where* the evidence is.
A model can reach a high AUC on shortcuts (stain, slide size); if its attention
also ranks the planted tiles first, the whole chain (tiling, features, MIL head)
is looking at the right thing. :func:`run_synthetic_validation` runs the real
chain (generate three sites, preprocess each with the real pipeline, train a
pooled gated-attention model on a patient-level train/val/test split) and
reports on the held-out slides:

* AUC (goal ≥ 0.95) with its bootstrap 95 % CI;
* for each positive held-out slide, the fraction of its :data:`TOP` highest-attention
  tiles that are planted (:func:`planted_tiles`); goal: mean ≥ 0.8.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from preprocessing.pipeline import PreprocessConfig, discover_slides, run_preprocess
from preprocessing.synth import generate_cohort
from wsi_fl.mil.data import FeatureBagDataset, read_labels
from wsi_fl.mil.fit import Site, fit
from wsi_fl.mil.training import TrainConfig, predict

TOP = 10  # highest-attention tiles looked at per positive slide


def planted_boxes(site_dir: Path) -> dict[str, list[tuple[int, int, int, int]]]:
    """slide id -> its planted rectangles (x, y, width, height in level-0 px), from ``site_dir/planted.csv``."""
    boxes: dict[str, list[tuple[int, int, int, int]]] = {}
    with open(site_dir / "planted.csv") as f:
        for r in csv.DictReader(f):
            boxes.setdefault(r["slide_id"], []).append((int(r["x"]), int(r["y"]), int(r["width"]), int(r["height"])))
    return boxes


def planted_tiles(coords: np.ndarray, tile: float, boxes: list[tuple[int, int, int, int]]) -> np.ndarray:
    """Per tile: True when more than half of its area lies inside one planted rectangle."""
    inside = np.zeros(len(coords), bool)
    for x, y, w, h in boxes:
        ox = np.clip(np.minimum(coords[:, 0] + tile, x + w) - np.maximum(coords[:, 0], x), 0, None)
        oy = np.clip(np.minimum(coords[:, 1] + tile, y + h) - np.maximum(coords[:, 1], y), 0, None)
        inside |= ox * oy > 0.5 * tile * tile
    return inside


def top_attention_planted(checkpoint: Path, sites: list[Site], test_ids: set[str]) -> list[float]:
    """Per positive held-out slide: the fraction of its :data:`TOP` highest-attention tiles that are planted."""
    from models.checkpoint import load_checkpoint

    model, ckpt = load_checkpoint(checkpoint)
    fractions = []
    for site in sites:
        table = read_labels(site.labels, classes=ckpt.classes)
        records = [r for r in table.records if r.slide_id in test_ids and r.label == ckpt.classes[-1]]
        if not records:
            continue
        ds = FeatureBagDataset(records, site.features_dir)
        preds = predict(model, ds, keep_attention=True)
        boxes = planted_boxes(site.labels.parent)
        for rec, path, att in zip(records, ds.paths, preds.attention, strict=True):
            with h5py.File(path) as f:
                coords, tile = f["coords"][()], float(f.attrs["tile_size_level0"])
            top = np.argsort(-att)[:TOP]
            fractions.append(float(planted_tiles(coords[top], tile, boxes[rec.slide_id]).mean()))
    return fractions


def run_synthetic_validation(out: Path, slides_per_site: int = 14, encoder: str = "resnet18_trunc",
                             seed: int = 0) -> dict[str, Any]:
    """Generate, preprocess, train and score under ``out``; returns the JSON-serialisable report."""
    cohort = generate_cohort(out / "cohort", sites=3, slides_per_site=slides_per_site, seed=seed, progress=False)
    sites = []
    for s in cohort:
        cfg = PreprocessConfig(out_dir=out / "features" / s.site, encoder=encoder, random_init=True, progress=False)
        results = run_preprocess(discover_slides([s.slides_dir]), cfg)
        failed = [r.error for r in results if r.status != "ok"]
        if failed:
            raise RuntimeError(f"preprocessing {s.site} failed: {failed}")
        sites.append(Site(s.site, cfg.out_dir / "features", s.labels_csv))
    result = fit(sites, out / "model", train=TrainConfig(epochs=40, seed=seed), test_frac=0.3, progress=False)
    with open(out / "model" / "splits.csv") as f:
        test = {r["slide_id"] for r in csv.DictReader(f) if r["split"] == "test"}
    fractions = top_attention_planted(result.checkpoint, sites, test)
    m = result.test_metrics or {}
    return {
        "slides": sum(s.n_slides for s in cohort), "encoder": encoder, "splits": result.split_sizes,
        "test_auc": m.get("auc"), "test_auc_ci95": m.get("auc_ci95"), "test_accuracy": m.get("accuracy"),
        "goal_auc": ">= 0.95", "auc_met": (m.get("auc") or 0) >= 0.95,
        "positive_test_slides": len(fractions),
        "top10_planted_fraction_mean": round(float(np.mean(fractions)), 3) if fractions else None,
        "top10_planted_fraction_per_slide": [round(f, 2) for f in fractions],
        "goal_attention": ">= 0.8", "attention_met": bool(fractions) and float(np.mean(fractions)) >= 0.8,
    }
