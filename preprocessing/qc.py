"""Per-slide quality-control image: what the tissue detector saw, which tiles were kept and which excluded.

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

from .artifacts import REASONS
from .atomic import atomic_path

_MIN_SIDE = 768  # small thumbnails are enlarged so outlines and tiles stay visible
_TISSUE_RGB = (0, 170, 0)
_TILE_RGB = (20, 60, 230)
#: Outline colours of tiles excluded by per-tile QC (:data:`preprocessing.artifacts.REASONS`), by the
#: first reason in this order; chosen apart from the blue of kept tiles and the green tissue outline.
EXCLUDED_RGB = {"pen": (255, 0, 255), "fold": (230, 0, 0), "blur": (255, 150, 0)}


def render_qc(
    thumbnail: np.ndarray,
    mask: np.ndarray,
    downsample: tuple[float, float],
    coords: np.ndarray,
    tile_size_level0: float,
    excluded: np.ndarray | None = None,
    reasons: np.ndarray | None = None,
) -> Image.Image:
    """The thumbnail with the tissue outline (green), each kept tile's square (blue) and each tile
    excluded by QC (``excluded`` level-0 coords, ``reasons`` bits) in its reason's colour
    (:data:`EXCLUDED_RGB`: pen magenta, fold red, blur orange), with a legend of the counts."""
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
    if excluded is not None and len(excluded):
        counts = dict.fromkeys(EXCLUDED_RGB, 0)
        for (x, y), bits in zip(np.asarray(excluded, np.float64), np.asarray(reasons), strict=True):
            name = next((k for k in EXCLUDED_RGB if int(bits) & REASONS[k]), "blur")
            counts[name] += 1
            box = (x * fx + 1, y * fy + 1, x * fx + side_x - 1, y * fy + side_y - 1)  # inside: kept neighbours stay
            draw.rectangle(box, outline=EXCLUDED_RGB[name], width=2 if side_x > 8 else 1)
        legend = [(f"excluded {k}: {n}", EXCLUDED_RGB[k]) for k, n in counts.items() if n]
        for i, (text, colour) in enumerate(legend):
            draw.rectangle((4, 4 + 14 * i, 14, 14 + 14 * i), fill=colour)
            draw.text((18, 3 + 14 * i), text, fill=(0, 0, 0))
    return img


def save_qc(image: Image.Image, path: str | os.PathLike) -> Path:
    """Write the PNG under a temporary name, then rename (never a half-written image)."""
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")
    return Path(path)
