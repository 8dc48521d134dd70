"""Tissue detection: synthetic scenes with known answers, then the real shared slides."""

from __future__ import annotations

import numpy as np
import pytest
from skimage.color import rgb2hsv

from preprocessing.errors import SlideError
from preprocessing.slide import open_slide
from preprocessing.tissue import TissueParams, compute_tissue_mask, detect_tissue, ink_mask, saturation_u8

MPP = 8.0  # µm/px of the synthetic "thumbnails", the default mask resolution
PINK = (220, 140, 190)
GLASS = (242, 242, 240)


def glass(h: int, w: int, seed: int = 0, noise: float = 2.0) -> np.ndarray:
    """Empty slide: near-white glass with sensor noise."""
    rng = np.random.default_rng(seed)
    img = np.asarray(GLASS, np.float32) + rng.normal(0, noise, (h, w, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def paint(img: np.ndarray, where: np.ndarray, color: tuple[int, int, int], seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    vals = np.asarray(color, np.float32) + rng.normal(0, 6, (int(where.sum()), 3))
    img[where] = np.clip(vals, 0, 255).astype(np.uint8)
    return img


def disk(h: int, w: int, cy: float, cx: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[:h, :w]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def test_saturation_matches_hsv():
    rgb = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    assert np.abs(saturation_u8(rgb) / 255 - rgb2hsv(rgb)[..., 1]).max() <= 1 / 255 + 1e-9


def test_blob_found():
    blob = disk(200, 240, 100, 120, 40)
    mask = detect_tissue(paint(glass(200, 240), blob, PINK), TissueParams(), MPP)
    iou = (mask & blob).sum() / (mask | blob).sum()
    assert iou > 0.95
    assert not mask[~disk(200, 240, 100, 120, 45)].any()  # nothing away from the blob


@pytest.mark.parametrize(
    "img",
    [
        np.full((120, 150, 3), 255, np.uint8),  # perfectly uniform white: Otsu is undefined
        np.full((120, 150, 3), 200, np.uint8),  # uniform grey glass
        np.zeros((120, 150, 3), np.uint8),  # black (scanner failure)
        glass(120, 150, noise=4.0),  # noisy glass: Otsu alone would split the noise in two
        np.full((120, 150, 3), (235, 238, 245), np.uint8),  # faintly tinted glass
    ],
    ids=["white", "grey", "black", "noisy-glass", "tinted"],
)
def test_blank_slide_gives_empty_mask(img):
    mask = detect_tissue(img, TissueParams(), MPP)
    assert mask.shape == img.shape[:2] and mask.dtype == bool
    assert not mask.any()


def test_empty_image():
    assert detect_tissue(np.zeros((0, 0, 3), np.uint8), TissueParams(), MPP).shape == (0, 0)


def test_slide_covered_by_pale_and_dark_tissue_is_all_tissue():
    """Otsu would split pale from dark tissue; the ceiling on the threshold keeps both."""
    img = glass(100, 100)
    paint(img, np.ones((100, 100), bool), (180, 80, 160))
    paint(img, np.arange(100)[None, :].repeat(100, 0) < 50, (235, 190, 220))  # pale stroma, sat ≈ 0.19
    assert detect_tissue(img, TissueParams(), MPP).all()


def test_fixed_threshold_overrides_otsu():
    img = glass(100, 100)
    dark = np.zeros((100, 100), bool)
    dark[20:80, 10:45] = True
    pale = np.zeros((100, 100), bool)
    pale[20:80, 55:90] = True
    paint(img, dark, (180, 80, 160))
    paint(img, pale, (235, 190, 220), seed=2)
    mask = detect_tissue(img, TissueParams(saturation_threshold=0.4), MPP)
    assert mask[dark].mean() > 0.95 and not mask[pale].any()


def square_with_holes() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    img = glass(200, 200)
    tissue = np.zeros((200, 200), bool)
    tissue[20:180, 20:180] = True
    small = np.zeros_like(tissue)
    small[50:57, 50:57] = True  # 49 px = 3,136 µm² < 4,000 µm²: a crack, filled
    big = np.zeros_like(tissue)
    big[100:130, 100:130] = True  # 900 px = 57,600 µm²: a lumen, kept
    return paint(img, tissue & ~small & ~big, PINK), small, big


def test_small_holes_filled_big_holes_kept():
    img, small, _big = square_with_holes()
    mask = detect_tissue(img, TissueParams(), MPP)
    assert mask[small].all()
    assert not mask[102:128, 102:128].any()  # (the median blur rounds the hole's corners)


def test_hole_filling_follows_params():
    img, small, big = square_with_holes()
    keep_all = detect_tissue(img, TissueParams(max_hole_um2=0, closing_um=0), MPP)
    assert not keep_all[51:56, 51:56].any()
    fill_all = detect_tissue(img, TissueParams(max_hole_um2=100_000), MPP)
    assert fill_all[small].all() and fill_all[big].all()


def test_pen_and_dark_debris_excluded():
    img = glass(200, 200)
    tissue = disk(200, 200, 100, 100, 60)
    paint(img, tissue, PINK)
    pen = np.zeros_like(tissue)
    pen[95:100, :] = True  # a black marker line across tissue and glass
    paint(img, pen, (25, 25, 35), seed=3)
    mask = detect_tissue(img, TissueParams(), MPP)
    assert not mask[pen].any()
    assert mask[tissue & ~pen].mean() > 0.97


# Marker ink as it reads at mask resolution: on glass and (darker) over pink tissue.
INKS = {
    "blue": ((40, 75, 185), (30, 38, 140)),
    "green": ((50, 150, 90), (40, 90, 60)),
    "cyan-dye": ((60, 160, 170), (50, 100, 120)),
}


@pytest.mark.parametrize("ink", sorted(INKS))
def test_coloured_pen_is_not_tissue(ink):
    """A marker stroke across tissue and glass: without pen removal it is tissue, with it it is not."""
    on_glass, on_tissue = INKS[ink]
    img = glass(200, 200)
    tissue = disk(200, 200, 100, 100, 60)
    paint(img, tissue, PINK)
    pen = np.zeros_like(tissue)
    pen[94:102, :] = True
    paint(img, pen & ~tissue, on_glass, seed=3)
    paint(img, pen & tissue, on_tissue, seed=4)
    kept = detect_tissue(img, TissueParams(remove_pen=False), MPP)
    assert kept[pen & ~tissue].mean() > 0.9  # the old behaviour the removal fixes
    mask = detect_tissue(img, TissueParams(), MPP)
    assert not mask[pen].any()
    assert mask[tissue & ~pen].mean() > 0.9  # only a margin of the stroke's width goes with it
    assert not mask[~tissue].any()


@pytest.mark.parametrize(
    "color",
    [(150, 150, 190), (170, 160, 215), (95, 90, 175), (130, 70, 170), (230, 110, 170), (200, 90, 110)],
    ids=["bluish-haematoxylin", "pale-blue", "saturated-nuclei", "purple", "pink", "red-eosin"],
)
def test_stain_colours_are_not_ink(color):
    """H&E hues, including bluish haematoxylin up to the saturation dense nuclei reach, stay tissue."""
    img = paint(glass(100, 100), disk(100, 100, 50, 50, 30), color)
    assert ink_mask(img, TissueParams()).mean() < 0.01
    assert detect_tissue(img, TissueParams(), MPP)[disk(100, 100, 50, 50, 28)].mean() > 0.95


def test_pen_params_validated():
    with pytest.raises(ValueError, match="pen_hue"):
        TissueParams(pen_hue_min=200, pen_hue_max=100)
    with pytest.raises(ValueError, match="pen_saturation"):
        TissueParams(pen_saturation=1.5)


def test_opening_drops_thin_strands_only_when_asked():
    img = glass(120, 200)
    blob = disk(120, 200, 60, 50, 35)
    strand = np.zeros_like(blob)
    strand[59:62, 80:190] = True  # 24 µm wide
    paint(img, blob | strand, PINK)
    assert detect_tissue(img, TissueParams(), MPP)[strand & ~blob].mean() > 0.9
    opened = detect_tissue(img, TissueParams(opening_um=16), MPP)
    assert not opened[strand & ~disk(120, 200, 60, 50, 40)].any() and opened[blob].mean() > 0.95


def test_tiny_biopsy_islands_kept_dust_removed():
    """Five 64-µm fragments on an otherwise empty slide survive; single-pixel specks do not."""
    h, w = 300, 400
    img = glass(h, w)
    islands = [disk(h, w, 50 + 50 * i, 80 + 60 * i, 4) for i in range(5)]  # r = 32 µm each
    for i, isl in enumerate(islands):
        paint(img, isl, PINK, seed=10 + i)
    dust = np.zeros((h, w), bool)
    dust[20, 300] = dust[250, 40] = dust[150, 350] = True
    paint(img, dust, (90, 60, 120), seed=20)
    mask = detect_tissue(img, TissueParams(), MPP)
    for isl in islands:
        assert mask[isl].mean() > 0.8
    assert not mask[dust].any()
    assert mask.mean() < 0.01


def test_detection_is_resolution_independent():
    """The same scene at 4 and 8 µm/px gives the same tissue fraction (sizes are in µm)."""
    fractions = []
    for scale, mpp in [(1, 8.0), (2, 4.0)]:
        h, w = 150 * scale, 200 * scale
        img = glass(h, w)
        paint(img, disk(h, w, 75 * scale, 100 * scale, 50 * scale), PINK)
        paint(img, disk(h, w, 30 * scale, 30 * scale, 5 * scale), PINK, seed=4)
        fractions.append(detect_tissue(img, TissueParams(), mpp).mean())
    assert fractions[0] == pytest.approx(fractions[1], abs=0.01)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"mask_mpp": 0},
        {"min_saturation": 0.5, "max_saturation": 0.2},
        {"saturation_threshold": 2.0},
        {"closing_um": -1},
        {"max_mask_side": 0},
    ],
)
def test_params_validated(kwargs):
    with pytest.raises(ValueError):
        TissueParams(**kwargs)


# -- real slides ---------------------------------------------------------------------------------


def test_cmu_small_region(slide_file):
    with open_slide(slide_file("cmu-1-small-region.svs")) as slide:
        tm = compute_tissue_mask(slide)
        w, h = slide.dimensions
    mask = tm.mask
    assert mask.shape == tm.thumbnail.shape[:2]
    assert mask.shape[1] * tm.downsample[0] == pytest.approx(w)
    assert mask.shape[0] * tm.downsample[1] == pytest.approx(h)
    assert tm.downsample[0] == pytest.approx(8.0 / 0.499, rel=0.02)  # ~8 µm/px
    assert 0.2 < tm.tissue_fraction < 0.6
    assert not mask[:10, :10].any()  # the top-left corner is glass
    sat = saturation_u8(tm.thumbnail)
    assert sat[mask].mean() > 3 * sat[~mask].mean()


def test_slide_without_mpp(slide_file):
    path = slide_file("tcga-cr-7395-01a-01-ts1.svs")
    with open_slide(path) as slide:
        with pytest.raises(SlideError, match="MPP"):
            compute_tissue_mask(slide)
        by_keyword = compute_tissue_mask(slide, mpp=0.25)
    with open_slide(path, user_mpp=0.25) as slide:
        tm = compute_tissue_mask(slide)
    assert tm.tissue_fraction > 0.4
    np.testing.assert_array_equal(tm.mask, by_keyword.mask)


def test_mask_size_capped_for_huge_slides(slide_file):
    with open_slide(slide_file("tcga-cr-7395-01a-01-ts1.svs"), user_mpp=0.25) as slide:
        tm = compute_tissue_mask(slide, TissueParams(max_mask_side=64))
    assert max(tm.mask.shape) <= 64 and tm.mask.any()


def test_kidney_imageslide_tiny_island(slide_file):
    """Non-pyramidal TIFF through ImageSlide, mostly glass with one small fragment."""
    with open_slide(slide_file("kidney-48-5.tif"), user_mpp=1.0) as slide:
        assert slide.info.vendor == "ImageSlide"
        tm = compute_tissue_mask(slide)
    assert 0 < tm.tissue_fraction < 0.01


def test_real_slides_marking_dye_removed_tissue_kept(slide_file):
    """CMU-1's crop carries teal tissue-marking dye at its edges: removed, the H&E stays.

    The kidney slide's bluish (haematoxylin-dominated) fragment and the TCGA section
    have no ink and must lose nothing to the pen rule.
    """
    with open_slide(slide_file("cmu-1-small-region.svs")) as slide:
        with_pen, no_pen = compute_tissue_mask(slide), compute_tissue_mask(slide, TissueParams(remove_pen=False))
    ink = ink_mask(with_pen.thumbnail, TissueParams())
    assert ink.sum() >= 5 and (ink & no_pen.mask).any()
    assert not (ink & with_pen.mask).any()
    assert 0.95 < with_pen.mask.sum() / no_pen.mask.sum() < 1.0
    for name, mpp in [("tcga-cr-7395-01a-01-ts1.svs", 0.25), ("kidney-48-5.tif", 1.0)]:
        with open_slide(slide_file(name), user_mpp=mpp) as slide:
            a, b = compute_tissue_mask(slide), compute_tissue_mask(slide, TissueParams(remove_pen=False))
        assert a.mask.any() and np.array_equal(a.mask, b.mask)
