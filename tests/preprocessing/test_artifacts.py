"""Per-tile QC measures against the synthetic generator's artifact ground truth (``artifacts.csv``)."""

from __future__ import annotations

import csv
from dataclasses import replace

import numpy as np
import pytest
from artifactsites import artifact_boxes, coverage
from sklearn.metrics import roc_auc_score

from preprocessing.artifacts import (
    REASONS,
    SlideReference,
    laplacian_variance,
    pen_fraction,
    qc_keep,
    qc_reasons,
    tile_qc,
)
from preprocessing.params import QCParams
from preprocessing.slide import open_slide
from preprocessing.synth import PRESETS, generate_cohort
from preprocessing.tiling import tile_coordinates
from preprocessing.tissue import TissueParams, compute_tissue_mask


@pytest.fixture(scope="module")
def slides(artifact_slides):
    """Per slide: tiles of the default pen-removing mask, the same without pen removal, QC measures, boxes."""
    result = []
    for path in artifact_slides:
        boxes = artifact_boxes(path)
        with open_slide(path) as slide:
            tm = compute_tissue_mask(slide)
            grid = tile_coordinates(slide, tm)
            off = tile_coordinates(slide, compute_tissue_mask(slide, TissueParams(remove_pen=False)))
            t = round(grid.tile_size_level0)
            tiles = np.stack([slide.read_region((int(x), int(y)), 0, (t, t)) for x, y in grid.coords])
            dims = slide.dimensions
        qc = tile_qc(tiles, SlideReference.from_mask(tm.thumbnail, tm.mask))
        cov = {k: coverage(grid.coords, t, b, dims) for k, b in boxes.items()}
        result.append({"grid": grid, "off": off, "boxes": boxes, "qc": qc, "cov": cov, "dims": dims, "t": t})
    return result


def test_kept_tiles_rarely_overlap_pen(slides):
    """≤ 5 % of kept tiles lie mostly (> 50 %) inside pen boxes; without pen removal more do."""
    kept = sum(len(s["grid"]) for s in slides)
    on_pen = sum(int((s["cov"]["pen"] > 0.5).sum()) for s in slides)
    off_pen = sum(int((coverage(s["off"].coords, s["t"], s["boxes"]["pen"], s["dims"]) > 0.5).sum()) for s in slides)
    assert kept > 100
    assert on_pen / kept <= 0.05
    assert off_pen > on_pen
    # With QC exclusion on top, tiles with a quarter of ink go too.
    keep = np.concatenate([qc_keep(s["qc"], QCParams(max_pen_fraction=0.25)) for s in slides])
    mostly_pen = np.concatenate([s["cov"]["pen"] > 0.5 for s in slides])
    assert (mostly_pen & keep).sum() < on_pen or on_pen == 0


def _auc(slides, kind: str, measure: str, sign: float, inside: float) -> float:
    y, score = [], []
    for s in slides:
        clean = sum(s["cov"].values()) == 0
        hit = s["cov"][kind] >= inside
        sel = hit | clean
        y += list(hit[sel])
        score += list(sign * s["qc"][measure][sel])
    assert 3 <= sum(y) < len(y)
    return float(roc_auc_score(y, score))


def test_blur_separates_out_of_focus_patches(slides):
    assert _auc(slides, "blur", "blur", -1.0, 0.99) > 0.9


def test_fold_fraction_finds_folds(slides):
    assert _auc(slides, "fold", "fold_fraction", 1.0, 0.5) > 0.9


def test_pen_fraction_finds_ink(slides):
    assert _auc(slides, "pen", "pen_fraction", 1.0, 0.5) > 0.9


def test_planted_tumour_is_not_fold_or_pen(tmp_path):
    """Dense, dark tumour nuclei must not read as fold or ink (that would drop the signal)."""
    cfg = replace(PRESETS["realistic"], size_range=(1500, 1600), min_region_side=256, tumour_contrast=1.0,
                  tumour_fraction=(0.2, 0.3), pen_strokes=(0, 0), folds=(0, 0), blur_patches=(0, 0))
    generate_cohort(tmp_path, sites=1, slides_per_site=4, seed=0, config=cfg, progress=False)
    with open(tmp_path / "site_1" / "planted.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows
    for r in rows:
        x, y, w, h = (int(r[k]) for k in ("x", "y", "width", "height"))
        with open_slide(tmp_path / "site_1" / "slides" / f"{r['slide_id']}.tiff") as slide:
            tm = compute_tissue_mask(slide)
            tiles = slide.read_region((x, y), 0, (w // 224 * 224, h // 224 * 224))
        tiles = tiles.reshape(h // 224, 224, w // 224, 224, 3).swapaxes(1, 2).reshape(-1, 224, 224, 3)
        qc = tile_qc(tiles, SlideReference.from_mask(tm.thumbnail, tm.mask))
        assert qc["fold_fraction"].mean() < 0.05 and qc["pen_fraction"].max() < 0.05


def test_measures_on_known_images():
    rng = np.random.default_rng(0)
    sharp = rng.integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    flat = np.full((1, 64, 64, 3), 200, np.uint8)
    lv = laplacian_variance(np.concatenate([sharp, flat]))
    assert lv.shape == (3,) and lv[2] == 0 and (lv[:2] > 1000).all()
    blue = np.zeros((1, 64, 64, 3), np.uint8) + np.array([40, 75, 185], np.uint8)
    pink = np.zeros((1, 64, 64, 3), np.uint8) + np.array([220, 140, 190], np.uint8)
    assert pen_fraction(blue)[0] == 1.0 and pen_fraction(pink)[0] == 0.0
    keep = qc_keep({"blur": lv, "pen_fraction": np.zeros(3), "fold_fraction": np.zeros(3)}, QCParams(min_sharpness=1))
    assert keep.tolist() == [True, True, False]
    with pytest.raises(ValueError):
        laplacian_variance(np.zeros((4, 4), np.float32))
    with pytest.raises(ValueError):
        QCParams(max_pen_fraction=2)


def test_default_thresholds_and_reasons():
    """Default thresholds exclude by reason (bits); the blur ratio needs the slide's sharpness; off excludes nothing."""
    measures = {"blur": np.array([5, 40, 40, 40, 40], np.float32), "pen_fraction": np.array([0, 0, 0.5, 0, 0.5]),
                "fold_fraction": np.array([0, 0, 0, 0.6, 0.6])}
    ref = SlideReference(saturation=80, grey=150, hue=320, sharpness=30.0)
    reasons = qc_reasons(measures, QCParams(), ref)
    assert reasons.tolist() == [REASONS["blur"], 0, REASONS["pen"], REASONS["fold"], REASONS["pen"] | REASONS["fold"]]
    assert qc_keep(measures, QCParams(), ref).tolist() == [False, True, False, False, False]
    assert qc_reasons(measures, QCParams())[0] == 0  # no slide sharpness: the relative blur test is skipped
    assert qc_keep(measures, QCParams(enabled=False), ref).all()
    none = QCParams(min_sharpness_ratio=None, max_pen_fraction=None, max_fold_fraction=None)
    assert qc_keep(measures, none, ref).all()
    assert ref.with_sharpness(np.zeros((0, 8, 8, 3), np.uint8)) == ref
    assert ref.with_sharpness(np.full((2, 8, 8, 3), 100, np.uint8)).sharpness == 0.0
