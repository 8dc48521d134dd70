"""Synthetic whole slides for the preprocessing benchmarks: large pyramidal TIFFs with a set tissue area.

Why generated, and why here: the timing and memory goals are stated for slide
sizes (50,000² and 100,000² px) and tissue areas no shared test slide has, and
two scripts need the very same slides (``scripts/bench_tissue.py`` times tissue
detection and tiling on them, ``scripts/bench_memory.py`` compares a preprocess's
peak memory at 1× and 4× the tissue). A slide is written once per parameter set
into a cache directory (:func:`cached_slide`), so later runs read it from the OS
page cache instead of regenerating gigabytes of JPEG tiles.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np

#: Level-0 px per cell of the tissue map the renderer samples (16 µm at 0.25 µm/px).
_CELL = 64
#: Fraction of the slide covered by tissue at ``tissue_scale=1`` (×4 must still fit in 1).
_BASE_TISSUE = 0.2
#: Bump when the generated pixels change, so cached slides are regenerated.
_VERSION = 1
_TILE = 256


def _tissue_map(size: int, tissue_scale: float, seed: int) -> np.ndarray:
    """Bool map (one cell per ``_CELL`` level-0 px) of smooth random blobs covering a set fraction.

    Thresholding one smooth random field at a quantile makes the tissue area
    proportional to ``tissue_scale`` exactly (up to cell rounding), and the
    tissue of a larger scale contains that of a smaller one.
    """
    from scipy import ndimage

    frac = _BASE_TISSUE * tissue_scale
    if not 0 < frac <= 1:
        raise ValueError(f"tissue_scale must be in (0, {1 / _BASE_TISSUE:g}], got {tissue_scale}")
    cells = -(-size // _CELL)
    rng = np.random.default_rng(seed)
    coarse = ndimage.gaussian_filter(rng.standard_normal((96, 96)), sigma=4, mode="wrap")
    field = ndimage.zoom(coarse, cells / 96, order=1, grid_mode=True, mode="grid-wrap")[:cells, :cells]
    # Keep a blank margin (glass around the section), as on real slides.
    margin = max(1, cells // 40)
    inner = field[margin:-margin, margin:-margin]
    out = np.zeros((cells, cells), bool)
    q = min(frac * cells * cells / inner.size, 1.0)  # so the whole slide's fraction is ``frac``
    out[margin:-margin, margin:-margin] = inner > np.quantile(inner, 1 - q)
    return out


def _texture(seed: int) -> np.ndarray:
    """A 256² H&E-ish tile: pink stroma with purple nuclei, mild noise (cheap to JPEG-encode)."""
    rng = np.random.default_rng(seed + 1)
    tex = np.empty((_TILE, _TILE, 3), np.float32)
    tex[:] = (226, 150, 196)
    yy, xx = np.mgrid[:_TILE, :_TILE]
    for cx, cy in rng.integers(0, _TILE, (40, 2)):
        d2 = (xx - cx) ** 2 + (yy - cy) ** 2
        tex[d2 < 36] = (120, 70, 150)
    tex += rng.normal(0, 6, tex.shape)
    return np.clip(tex, 0, 255).astype(np.uint8)


def make_bench_slide(
    path: str | os.PathLike, size: int, mpp: float = 0.25, tissue_scale: float = 1.0, seed: int = 0
) -> Path:
    """Write a ``size``² px pyramidal JPEG TIFF at ``mpp`` with tissue blobs on white glass.

    ``tissue_scale`` scales the tissue *area* (1.0 ≈ 20 % of the slide, up to 5.0).
    Rendering is per 256² tile from a coarse tissue map: tiles entirely on glass or
    entirely in tissue are cached arrays, only boundary tiles are composed per pixel.
    """
    from preprocessing.tiffwrite import write_pyramidal_tiff

    path = Path(path)
    tmap = _tissue_map(size, tissue_scale, seed)
    cells = tmap.shape[0]
    tex = _texture(seed)
    white = np.full((_TILE, _TILE, 3), 255, np.uint8)

    def render(ds: float, x: int, y: int, w: int, h: int) -> np.ndarray:
        # Map cell of each output pixel's centre; sample the map block this tile covers.
        cx = np.minimum(((x + np.arange(w) + 0.5) * ds // _CELL).astype(np.intp), cells - 1)
        cy = np.minimum(((y + np.arange(h) + 0.5) * ds // _CELL).astype(np.intp), cells - 1)
        block = tmap[cy[0] : cy[-1] + 1, cx[0] : cx[-1] + 1]
        if not block.any():
            return white[:h, :w]
        if block.all():
            return tex[:h, :w]
        sub = tmap[np.ix_(cy, cx)]
        return np.where(sub[..., None], tex[:h, :w], white[:h, :w])

    path.parent.mkdir(parents=True, exist_ok=True)
    write_pyramidal_tiff(path, size, size, render, mpp=mpp, tile=_TILE)
    return path


def cached_slide(
    cache_dir: Path, size: int, mpp: float = 0.25, tissue_scale: float = 1.0, seed: int = 0
) -> Path:
    """The benchmark slide for these parameters, generated on first use."""
    path = cache_dir / f"bench-v{_VERSION}-{size}-mpp{mpp:g}-ts{tissue_scale:g}-s{seed}.tiff"
    if not path.exists():
        t = time.perf_counter()
        print(f"generating {path.name} ...", file=sys.stderr, flush=True)
        make_bench_slide(path, size, mpp=mpp, tissue_scale=tissue_scale, seed=seed)
        print(f"  written in {time.perf_counter() - t:.1f} s", file=sys.stderr, flush=True)
    return path
