"""Write tiled, pyramidal, JPEG-compressed TIFFs that OpenSlide opens as multi-level slides.

Used by the synthetic cohort and the benchmarks' large slides. Each pyramid
level is its own top-level IFD (not a SubIFD: OpenSlide reads a SubIFD pyramid
as one level), the resolution tags carry the MPP (OpenSlide ≥ 4 reports it as
``openslide.mpp-x``), and pixels are rendered tile by tile through a callback,
so a 100,000 × 100,000 px slide is written in bounded memory. The file appears
under its final name only once complete.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator

import numpy as np
import tifffile

from .atomic import atomic_path

#: ``render(downsample, x, y, w, h)`` -> (h, w, 3) uint8: the pixels of the level whose
#: downsample is ``downsample``, in that level's coordinates.
Renderer = Callable[[float, int, int, int, int], np.ndarray]


def pyramid_shapes(width: int, height: int, min_size: int = 512) -> list[tuple[float, int, int]]:
    """(downsample, width, height) of each level: factors of 2 until the long side is < ``min_size``."""
    levels = [(1.0, width, height)]
    ds = 1
    while max(width, height) / (ds * 2) >= min_size:
        ds *= 2
        levels.append((float(ds), math.ceil(width / ds), math.ceil(height / ds)))
    return levels


def _tiles(render: Renderer, ds: float, width: int, height: int, tile: int) -> Iterator[np.ndarray]:
    for y in range(0, height, tile):
        for x in range(0, width, tile):
            w, h = min(tile, width - x), min(tile, height - y)
            pixels = np.asarray(render(ds, x, y, w, h), dtype=np.uint8)
            if pixels.shape != (h, w, 3):
                raise ValueError(f"renderer returned {pixels.shape}, expected {(h, w, 3)}")
            if (w, h) != (tile, tile):
                padded = np.full((tile, tile, 3), 255, np.uint8)
                padded[:h, :w] = pixels
                pixels = padded
            yield pixels


def write_pyramidal_tiff(
    path: str | os.PathLike,
    width: int,
    height: int,
    render: Renderer,
    *,
    mpp: float,
    tile: int = 256,
    min_size: int = 512,
    quality: int = 90,
) -> list[tuple[int, int]]:
    """Write the slide; returns the (width, height) of each level."""
    levels = pyramid_shapes(width, height, min_size)
    bigtiff = width * height * 3 * 4 // 3 > 2**31  # raw size of all levels, before compression
    with atomic_path(path) as tmp, tifffile.TiffWriter(tmp, bigtiff=bigtiff) as tw:
        for i, (ds, w, h) in enumerate(levels):
            res = 1e4 / (mpp * ds)  # pixels per centimetre
            tw.write(
                _tiles(render, ds, w, h, tile),
                shape=(h, w, 3),
                dtype=np.uint8,
                tile=(tile, tile),
                photometric="rgb",
                compression="jpeg",
                compressionargs={"level": quality},
                resolution=(res, res),
                resolutionunit="CENTIMETER",
                subfiletype=0 if i == 0 else 1,
                metadata=None,
            )
    return [(w, h) for _, w, h in levels]
