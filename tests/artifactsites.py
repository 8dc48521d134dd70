"""The small artifact cohort the per-tile QC tests measure against: slides with pen strokes, folds and blurred
patches, and the generator's ground truth (``artifacts.csv``) read back as boxes per kind."""

from __future__ import annotations

import csv
from dataclasses import replace
from pathlib import Path

import numpy as np

from preprocessing.synth import PRESETS, generate_cohort

# Realistic preset, small slides, every slide with a pen stroke, a fold and a blurred patch.
CFG = replace(
    PRESETS["realistic"], size_range=(1800, 2200), min_region_side=256,
    pen_strokes=(1, 2), folds=(1, 1), blur_patches=(1, 2),
)
KINDS = ("pen", "fold", "blur")


def make_artifact_cohort(root: Path) -> list[Path]:
    """Three sites' slides (seed 2) under ``root``; the sorted slide paths."""
    generate_cohort(root, sites=3, slides_per_site=1, seed=2, config=CFG, progress=False)
    return sorted(root.glob("*/slides/*.tiff"))


def artifact_boxes(slide: Path) -> dict[str, list[tuple[int, int, int, int]]]:
    """The ground-truth boxes (level-0 ``x0, y0, x1, y1``) of ``slide``, by kind (pen of any colour)."""
    with open(slide.parent.parent / "artifacts.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["slide_id"] == slide.stem]
    return {kind: [tuple(int(r[k]) for k in ("x0", "y0", "x1", "y1")) for r in rows if r["kind"].startswith(kind)]
            for kind in KINDS}


def coverage(coords: np.ndarray, tile: float, boxes: list[tuple[int, int, int, int]], dims) -> np.ndarray:
    """Fraction of each tile's area inside the union of ``boxes`` (rasterised at 4 px)."""
    m = np.zeros((dims[1] // 4 + 1, dims[0] // 4 + 1), bool)
    for x0, y0, x1, y1 in boxes:
        m[y0 // 4 : (y1 + 3) // 4, x0 // 4 : (x1 + 3) // 4] = True
    t = int(tile) // 4
    return np.array([m[int(y) // 4 : int(y) // 4 + t, int(x) // 4 : int(x) // 4 + t].mean() for x, y in coords])
