"""Per-slide quality-control image: what the tissue detector saw and which tiles were kept.

A hospital engineer skims these to catch a bad threshold, pen marks taken for
tissue, or a wrong MPP (tiles visibly too large or small) before features from
a whole batch go into training.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from skimage.segmentation import find_boundaries

from .atomic import atomic_path

_MIN_SIDE = 768  # small thumbnails are enlarged so outlines and tiles stay visible
_TISSUE_RGB = (0, 170, 0)
_TILE_RGB = (20, 60, 230)


def render_qc(
    thumbnail: np.ndarray,
    mask: np.ndarray,
    downsample: tuple[float, float],
    coords: np.ndarray,
    tile_size_level0: float,
) -> Image.Image:
    """The thumbnail with the tissue outline (green) and each kept tile's square (blue)."""
    scale = max(1, int(np.ceil(_MIN_SIDE / max(thumbnail.shape[:2]))))
    img = Image.fromarray(thumbnail)
    if mask.shape != thumbnail.shape[:2]:
        mask = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize(img.size)) > 127
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.Resampling.NEAREST)
        mask = np.kron(mask, np.ones((scale, scale), dtype=bool))
    arr = np.array(img)
    arr[find_boundaries(mask, mode="inner")] = _TISSUE_RGB
    img = Image.fromarray(arr)
    draw = ImageDraw.Draw(img)
    fx, fy = scale / downsample[0], scale / downsample[1]
    side_x, side_y = tile_size_level0 * fx, tile_size_level0 * fy
    for x, y in np.asarray(coords, dtype=np.float64):
        draw.rectangle((x * fx, y * fy, x * fx + side_x, y * fy + side_y), outline=_TILE_RGB)
    return img


def save_qc(image: Image.Image, path: str | os.PathLike) -> Path:
    """Write the PNG under a temporary name, then rename (never a half-written image)."""
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")
    return Path(path)
