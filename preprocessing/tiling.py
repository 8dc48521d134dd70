"""Tile grids at a physical resolution: where to read, at which level, how big.

Tiles are defined at ``target_mpp`` (e.g. 224 px at 0.5 µm/px = 112 µm), not at
a pyramid level, so two hospitals scanning at 0.25 and 0.5 µm/px produce tiles of
the same physical size. A tile is read at the coarsest pyramid level that is
still at least as fine as the target (never upsampled from a coarser level)
and resized to ``tile_size`` afterwards.

Coordinates are exact level-0 pixels. Whether a tile is kept depends on the
fraction of its area covered by tissue, computed for all tiles at once from an
integral image of the mask (see :func:`tissue_fractions`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .params import TilingParams
from .slide import Slide
from .tissue import TissueMask

__all__ = ["TileGrid", "TilingParams", "grid_positions", "plan_grid", "tile_coordinates", "tissue_fractions"]

#: A pyramid level whose downsample exceeds the wanted one by at most this fraction still counts
#: as "at least as fine" (file downsamples are rounded, e.g. 2.0005 for a 2× level).
LEVEL_TOLERANCE = 0.01
#: How much finer than the scan the target may be; beyond this, tiles would be mostly interpolation.
MAX_UPSAMPLING = 2.0


@dataclass(frozen=True)
class TileGrid:
    """The tiles of one slide and how to read them."""

    coords: np.ndarray  # (N, 2) int64 level-0 top-left (x, y), row-major (y, then x)
    read_level: int  # pyramid level the tiles are read from
    read_size: int  # tile side in read_level px (resized to tile_size afterwards)
    tile_size: int  # tile side in px at target_mpp
    tile_size_level0: float  # tile side in level-0 px = tile_size * target_mpp / mpp
    target_mpp: float
    mpp: float  # level-0 µm/px the grid was planned with
    #: (N,) float32 fraction of each kept tile's area that is tissue (for QC and weighting).
    tissue_fraction: np.ndarray | None = field(default=None, compare=False)

    def __len__(self) -> int:
        return len(self.coords)


def plan_grid(
    slide_dims: tuple[int, int],
    level_downsamples: tuple[float, ...] | list[float],
    mpp: float,
    params: TilingParams,
) -> tuple[int, int, float]:
    """(read_level, read_size, tile_size_level0) for tiles of ``params`` on a slide scanned at ``mpp``.

    ``read_level`` is the coarsest level whose downsample is at most the wanted
    one (``target_mpp / mpp``, with :data:`LEVEL_TOLERANCE`), so tiles are only
    ever downsampled when resized to ``tile_size``. When the target is *finer*
    than level 0 the tile is read at level 0 with ``read_size < tile_size`` and
    upsampled; a target more than :data:`MAX_UPSAMPLING` × finer than the scan is
    refused with a ``ValueError``, because such tiles would carry no real detail
    at the advertised resolution.
    """
    if not mpp > 0:
        raise ValueError(f"mpp must be > 0, got {mpp}")
    if min(slide_dims) < 1:
        raise ValueError(f"slide dimensions must be positive, got {slide_dims}")
    if not level_downsamples:
        raise ValueError("level_downsamples is empty")
    want = params.target_mpp / mpp  # level-0 px per target px
    if want * MAX_UPSAMPLING * (1 + LEVEL_TOLERANCE) < 1:
        raise ValueError(
            f"target_mpp {params.target_mpp} µm/px is {1 / want:.2f}× finer than the scan "
            f"({mpp} µm/px); at most {MAX_UPSAMPLING:g}× upsampling is allowed: "
            f"use a target_mpp of at least {mpp / MAX_UPSAMPLING:.3g}"
        )
    read_level = 0
    for level, ds in enumerate(level_downsamples):
        if ds <= want * (1 + LEVEL_TOLERANCE) and ds > level_downsamples[read_level]:
            read_level = level
    tile_size_level0 = params.tile_size * want
    read_size = max(1, round(tile_size_level0 / level_downsamples[read_level]))
    return read_level, read_size, tile_size_level0


def grid_positions(length: int, tile: float, step: float) -> np.ndarray:
    """Level-0 starts (int64) of the tiles along one axis that lie entirely inside ``[0, length)``.

    Starts are ``floor(i * step)``; a tile occupies ``ceil(tile)`` px, so the last
    one ends at or before ``length``. Empty if the axis is shorter than one tile.
    """
    span = math.ceil(tile - 1e-9)
    if length < span:
        return np.zeros(0, np.int64)
    n = math.floor((length - span) / step + 1e-9) + 1
    return np.floor(np.arange(n) * step + 1e-9).astype(np.int64)


def _integral_at(cum: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """Rows of an integral image (``cum[k]`` = sum of the first ``k`` rows) at fractional ``pos``.

    The mask is piecewise constant per pixel, so its integral is piecewise linear
    between pixel edges: linear interpolation here is exact, not an approximation.
    """
    n = cum.shape[0] - 1
    pos = np.clip(pos, 0, n)
    i0 = np.minimum(np.floor(pos).astype(np.intp), max(n - 1, 0))
    frac = (pos - i0)[:, None]
    a = cum[i0]
    return a + (cum[np.minimum(i0 + 1, n)] - a) * frac


def tissue_fractions(
    mask: np.ndarray, downsample: tuple[float, float], xs: np.ndarray, ys: np.ndarray, tile: float
) -> np.ndarray:
    """(len(ys), len(xs)) exact fraction of tissue in the level-0 squares ``[x, x+tile) × [y, y+tile)``.

    Area-averaging of the mask through its integral image, evaluated only at the
    grid's 2·nx × 2·ny corner positions: one pass over the mask (row prefix sums),
    then work proportional to rows × tiles; no loop over tiles.
    """
    if len(xs) == 0 or len(ys) == 0 or mask.size == 0:
        return np.zeros((len(ys), len(xs)), np.float32)
    dsx, dsy = downsample
    h, w = mask.shape
    # Row prefix sums, read only at the 2·nx column edges: S(x) = rowcum[:, k-1] + frac · mask[:, k].
    rowcum = np.cumsum(mask, axis=1, dtype=np.int32 if w < 2**31 else np.int64)
    xq = np.clip(np.concatenate([xs / dsx, (xs + tile) / dsx]), 0, w)
    k = np.minimum(np.floor(xq).astype(np.intp), w - 1)
    cols = np.where(k > 0, rowcum[:, np.maximum(k - 1, 0)], 0) + mask[:, k] * (xq - k)
    del rowcum
    # Column integral of those (small: (h + 1) × 2·nx), read at the 2·ny row edges.
    cum = np.zeros((h + 1, len(xq)), np.float64)
    np.cumsum(cols, axis=0, out=cum[1:])
    yq = np.concatenate([ys / dsy, (ys + tile) / dsy])
    s = _integral_at(cum, yq)
    nx, ny = len(xs), len(ys)
    x0, x1 = slice(0, nx), slice(nx, 2 * nx)
    y0, y1 = slice(0, ny), slice(ny, 2 * ny)
    area = s[y1, x1] - s[y0, x1] - s[y1, x0] + s[y0, x0]
    return np.clip(area / ((tile / dsx) * (tile / dsy)), 0.0, 1.0).astype(np.float32)


def tile_coordinates(
    slide: Slide, mask: TissueMask, params: TilingParams = TilingParams(), *, mpp: float | None = None
) -> TileGrid:
    """The tiles of ``slide`` with at least ``params.min_tissue`` tissue, on a regular level-0 grid.

    The grid starts at (0, 0) with a step of ``stride * target_mpp / mpp`` level-0
    px; only tiles entirely inside the slide are considered, so a slide smaller
    than one tile gives an empty grid (the caller reports it). ``mpp`` overrides
    the slide's level-0 MPP, as in :func:`.tissue.compute_tissue_mask`.
    """
    mpp = slide.mpp if mpp is None else float(mpp)
    read_level, read_size, tile0 = plan_grid(slide.dimensions, slide.level_downsamples, mpp, params)
    step0 = params.step * params.target_mpp / mpp
    width, height = slide.dimensions
    xs = grid_positions(width, tile0, step0)
    ys = grid_positions(height, tile0, step0)
    frac = tissue_fractions(mask.mask, mask.downsample, xs, ys, tile0)
    # Tiny slack so a tile exactly at the threshold is not lost to float rounding.
    iy, ix = np.nonzero(frac >= params.min_tissue - 1e-6)  # row-major order
    coords = np.stack([xs[ix], ys[iy]], axis=1).astype(np.int64).reshape(-1, 2)
    return TileGrid(
        coords=coords,
        read_level=read_level,
        read_size=read_size,
        tile_size=params.tile_size,
        tile_size_level0=tile0,
        target_mpp=params.target_mpp,
        mpp=mpp,
        tissue_fraction=frac[iy, ix],
    )
