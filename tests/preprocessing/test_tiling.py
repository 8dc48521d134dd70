"""Tile geometry at a physical resolution, tissue fractions, and tiling of real and synthetic slides."""

from __future__ import annotations

import numpy as np
import pytest

from preprocessing.errors import SlideError
from preprocessing.slide import open_slide
from preprocessing.tiffwrite import write_pyramidal_tiff
from preprocessing.tiling import (
    TilingParams,
    grid_positions,
    plan_grid,
    tile_coordinates,
    tissue_fractions,
)
from preprocessing.tissue import TissueMask, compute_tissue_mask, saturation_u8

DIMS = (100_000, 80_000)


@pytest.mark.parametrize(
    ("mpp", "downsamples", "target", "expected"),
    [
        (0.25, (1, 2, 4, 8, 16), 0.5, (1, 224, 448.0)),  # 40× scan, 20× tiles: level 1 as is
        (0.25, (1, 4, 16), 0.5, (0, 448, 448.0)),  # no 2× level: read 448 px at level 0, shrink
        (0.25, (1, 2.0005, 4.001), 0.5, (1, 224, 448.0)),  # rounded file downsamples still count
        (0.5, (1, 4, 16), 0.5, (0, 224, 224.0)),
        (0.25, (1, 2, 4, 8), 1.0, (2, 224, 896.0)),
        (0.2527, (1, 4, 16), 0.5, (0, 443, 224 * 0.5 / 0.2527)),  # Aperio "40×": not quite 2×
        (0.5, (1, 4), 0.25, (0, 112, 112.0)),  # 2× upsampling: read at level 0, enlarge
        (1.0, (1,), 0.5, (0, 112, 112.0)),
    ],
)
def test_plan_grid(mpp, downsamples, target, expected):
    level, read_size, tile0 = plan_grid(DIMS, downsamples, mpp, TilingParams(target_mpp=target))
    assert (level, read_size) == expected[:2]
    assert tile0 == pytest.approx(expected[2])
    want = target / mpp
    # The chosen level is at least as fine as the target, and no coarser level is.
    assert level == 0 or downsamples[level] <= want * 1.01
    assert all(ds > want * 1.01 for ds in downsamples[level + 1 :])


def test_plan_grid_level_for_many_downsamples():
    """Over a sweep of scans, the read level never needs upsampling and is the coarsest such level."""
    pyramid = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0)
    for mpp in (0.12, 0.2, 0.25, 0.26, 0.3, 0.4, 0.5, 0.7, 1.0):
        for target in (0.5, 1.0, 2.0, 4.0):
            level, read_size, tile0 = plan_grid(DIMS, pyramid, mpp, TilingParams(target_mpp=target))
            ds = pyramid[level]
            assert ds <= max(target / mpp, 1.0) * 1.01
            assert level + 1 == len(pyramid) or pyramid[level + 1] > target / mpp * 1.01
            assert tile0 == pytest.approx(224 * target / mpp)
            assert read_size == round(tile0 / ds)
            if target >= mpp:  # never read fewer px than the tile has (no upsampling)
                assert read_size >= 224


def test_plan_grid_refuses_more_than_2x_upsampling():
    with pytest.raises(ValueError, match=r"finer than the scan.*0\.25"):
        plan_grid(DIMS, (1.0,), 0.5, TilingParams(target_mpp=0.2))


@pytest.mark.parametrize(
    ("length", "tile", "step"),
    [
        (1000, 224, 224),
        (1000, 224.45, 224.45),
        (1000, 448, 112.3),
        (448, 448, 448),
        (447, 448, 448),
        (16, 224, 224),
    ],
)
def test_grid_positions_inside(length, tile, step):
    xs = grid_positions(length, tile, step)
    assert xs.dtype == np.int64
    if length < np.ceil(tile):
        assert len(xs) == 0
        return
    assert xs[0] == 0 and np.all(np.diff(xs) > 0)
    assert xs[-1] + np.ceil(tile) <= length  # entirely inside
    assert xs[-1] + step + np.ceil(tile) > length  # and no room for one more


def test_tissue_fractions_exact():
    """Integral-image area averaging equals the exact overlap-weighted sum, also for fractional geometry."""
    rng = np.random.default_rng(0)
    mask = rng.random((23, 31)) < 0.4
    ds = (2.5, 2.25)
    tile = 7.3
    xs = np.array([0, 3, 10, 40, 69])
    ys = np.array([0, 1, 17, 40])
    got = tissue_fractions(mask, ds, xs, ys, tile)

    def overlaps(start: float, n: int, d: float) -> np.ndarray:
        lo = np.arange(n) * d
        return np.clip(np.minimum(lo + d, start + tile) - np.maximum(lo, start), 0, None)

    for j, y in enumerate(ys):
        for i, x in enumerate(xs):
            area = overlaps(y, 23, ds[1]) @ mask @ overlaps(x, 31, ds[0])
            assert got[j, i] == pytest.approx(area / tile**2, abs=1e-6)


def test_tissue_fractions_bounds():
    xs, ys = np.arange(0, 90, 10), np.arange(0, 50, 10)
    assert np.all(tissue_fractions(np.ones((10, 20), bool), (5.0, 5.0), xs, ys, 10) == 1)
    assert np.all(tissue_fractions(np.zeros((10, 20), bool), (5.0, 5.0), xs, ys, 10) == 0)
    assert tissue_fractions(np.ones((10, 20), bool), (5.0, 5.0), xs[:0], ys, 10).shape == (5, 0)


# -- a real pyramidal TIFF with known tissue: left half pink, right half glass -----------------

W, H, SPLIT = 2048, 1536, 1024


@pytest.fixture(scope="module")
def half_slide(tmp_path_factory):
    def render(ds, x, y, w, h):
        out = np.full((h, w, 3), 245, np.uint8)
        x0 = (x + np.arange(w)) * ds  # level-0 x of each column
        out[:, x0 < SPLIT] = (200, 110, 170)
        return out

    path = tmp_path_factory.mktemp("tiling") / "half.tiff"
    write_pyramidal_tiff(path, W, H, render, mpp=0.25, tile=256, min_size=256)
    return path


def half_mask() -> TissueMask:
    mask = np.zeros((H // 16, W // 16), bool)
    mask[:, : SPLIT // 16] = True
    return TissueMask(mask=mask, downsample=(16.0, 16.0), thumbnail=np.zeros((*mask.shape, 3), np.uint8))


@pytest.mark.parametrize(("min_tissue", "n_cols"), [(1.0, 2), (0.5, 2), (0.25, 3), (0.0, 4)])
def test_min_tissue_threshold(half_slide, min_tissue, n_cols):
    # 448-px tiles at x = 0, 448, 896, 1344; the one at 896 is 128/448 = 29 % tissue.
    with open_slide(half_slide) as slide:
        grid = tile_coordinates(slide, half_mask(), TilingParams(min_tissue=min_tissue))
    assert (grid.read_level, grid.read_size, grid.tile_size_level0) == (1, 224, 448.0)
    assert grid.coords.dtype == np.int64 and grid.coords.shape == (3 * n_cols, 2)
    assert sorted(set(grid.coords[:, 0].tolist())) == [0, 448, 896, 1344][:n_cols]
    assert sorted(set(grid.coords[:, 1].tolist())) == [0, 448, 896]
    assert np.all(grid.tissue_fraction >= min_tissue - 1e-6)
    # Row-major: sorted by y, then x.
    order = np.lexsort((grid.coords[:, 0], grid.coords[:, 1]))
    np.testing.assert_array_equal(order, np.arange(len(grid)))


def test_stride_overlap(half_slide):
    with open_slide(half_slide) as slide:
        all_tiles = tile_coordinates(slide, half_mask(), TilingParams(stride=112, min_tissue=0.0))
        full = tile_coordinates(slide, half_mask(), TilingParams(stride=112, min_tissue=1.0))
    xs = sorted(set(all_tiles.coords[:, 0].tolist()))
    assert xs == list(range(0, W - 448 + 1, 224))  # step = 112 px at 0.5 µm/px = 224 level-0 px
    assert len(all_tiles) == len(xs) * len(range(0, H - 448 + 1, 224))
    assert np.all(all_tiles.coords + 448 <= (W, H))
    assert sorted(set(full.coords[:, 0].tolist())) == [0, 224, 448]


def test_mask_and_tiles_on_synthetic_slide(half_slide):
    """End to end: detected tissue -> tiles only on the pink half, and they read as tissue."""
    with open_slide(half_slide) as slide:
        tm = compute_tissue_mask(slide)
        grid = tile_coordinates(slide, tm)
        tiles = [slide.read_region(tuple(c), grid.read_level, (grid.read_size,) * 2) for c in grid.coords]
    assert tm.tissue_fraction == pytest.approx(0.5, abs=0.02)
    assert len(grid) == 6 and np.all(grid.coords[:, 0] + grid.tile_size_level0 <= SPLIT)
    assert all(saturation_u8(t).mean() > 80 for t in tiles)


# -- real slides -------------------------------------------------------------------------------


def check_inside(grid, dims):
    assert grid.coords.dtype == np.int64 and grid.coords.ndim == 2 and grid.coords.shape[1] == 2
    assert np.all(grid.coords >= 0)
    assert np.all(grid.coords + grid.tile_size_level0 <= np.asarray(dims) + 1e-6)


def test_cmu_small_region_tiles(slide_file):
    with open_slide(slide_file("cmu-1-small-region.svs")) as slide:
        grid = tile_coordinates(slide, compute_tissue_mask(slide))
        check_inside(grid, slide.dimensions)
        tiles = [
            slide.read_region(tuple(c), grid.read_level, (grid.read_size,) * 2) for c in grid.coords[::8]
        ]
    assert len(grid) >= 20
    assert (grid.read_level, grid.read_size, grid.tile_size, grid.target_mpp) == (0, 224, 224, 0.5)
    assert grid.tile_size_level0 == pytest.approx(224 * 0.5 / 0.499)
    assert np.median([saturation_u8(t).mean() for t in tiles]) > 40  # stained tissue, not glass


def test_tcga_without_mpp(slide_file):
    path = slide_file("tcga-cr-7395-01a-01-ts1.svs")
    with open_slide(path) as slide, pytest.raises(SlideError, match="MPP"):
        tile_coordinates(slide, compute_tissue_mask(slide, mpp=0.25))
    with open_slide(path, user_mpp=0.25) as slide:
        grid = tile_coordinates(slide, compute_tissue_mask(slide))
        check_inside(grid, slide.dimensions)
    assert len(grid) >= 20
    assert (grid.read_level, grid.read_size, grid.tile_size_level0) == (1, 224, 448.0)


def test_small_slide_gives_zero_tiles(slide_file):
    with open_slide(slide_file("small.svs")) as slide:
        grid = tile_coordinates(slide, compute_tissue_mask(slide))
    assert len(grid) == 0 and grid.coords.shape == (0, 2) and grid.coords.dtype == np.int64


def test_kidney_imageslide_with_user_mpp(slide_file):
    with open_slide(slide_file("kidney-48-5.tif"), user_mpp=1.0) as slide:
        tm = compute_tissue_mask(slide)
        grid = tile_coordinates(slide, tm, TilingParams(target_mpp=1.0, tile_size=32))
        check_inside(grid, slide.dimensions)
    assert len(grid) >= 1
    ys, xs = np.nonzero(tm.mask)  # every tile lies on the single small fragment
    lo = np.array([xs.min() * tm.downsample[0], ys.min() * tm.downsample[1]]) - 32
    hi = np.array([(xs.max() + 1) * tm.downsample[0], (ys.max() + 1) * tm.downsample[1]])
    assert np.all((grid.coords >= lo) & (grid.coords <= hi))
