"""Pixels of one synthetic slide: tissue shape, planted tumour regions, stroma, nuclei and staining.

The cohort's rules (sites, patients, labels, each site's stain) live in
:mod:`preprocessing.synth`; this module turns one :class:`SlidePlan` and its
site's :class:`Stain` into a level-0 RGB image and the planted rectangles. Kept
apart because the rendering is most of the code and none of the contract: the
cohort's layout, CSVs and determinism are decided there, and only the look of
a slide here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image
from scipy.ndimage import binary_dilation, binary_erosion, gaussian_filter
from skimage.draw import ellipse
from skimage.transform import integral_image

if TYPE_CHECKING:
    from .synth import SynthConfig

# Low-resolution fields (tissue shape, region placement) live on a grid this many
# level-0 pixels per cell: fine enough for ragged tissue edges, cheap to smooth.
_LR = 8
# Stroma fibres are drawn on a grid this much coarser than level 0 and upsampled.
_FIBRE_DS = 2
_ANGLE_BINS = 12
_MAX_TISSUE_ATTEMPTS = 20
# Planted rectangles keep at least this many low-res cells (× _LR px) apart, so they read as separate regions.
_REGION_GAP = 8


@dataclass(frozen=True)
class Stain:
    """One site's staining: OD vectors, stain strengths and the glass colour."""

    h: tuple[float, float, float]
    e: tuple[float, float, float]
    h_gain: float
    e_gain: float
    background: tuple[float, float, float]


@dataclass(frozen=True)
class SlidePlan:
    """One slide as the cohort plan decides it; its pixels follow from ``seed`` alone, whatever else is drawn."""

    slide_id: str
    patient_id: str
    label: int
    width: int
    height: int
    seed: tuple[int, ...]  # SeedSequence entropy for this slide's pixels


Rect = tuple[int, int, int, int]  # x, y, width, height in level-0 px


# --------------------------------------------------------------------------------------------------
# Slide geometry: tissue and planted regions
# --------------------------------------------------------------------------------------------------
def _unit(a: np.ndarray) -> np.ndarray:
    return (a - a.mean()) / (a.std() + 1e-6)


def _tissue_field(rng: np.random.Generator, shape: tuple[int, int], fraction: float) -> np.ndarray:
    """Soft tissue mask (0..1) on the low-res grid: a few large ragged blobs away from the edges."""
    h, w = shape
    side = min(h, w)
    coarse = _unit(gaussian_filter(rng.standard_normal(shape, np.float32), 0.07 * side))
    ragged = _unit(gaussian_filter(rng.standard_normal(shape, np.float32), 0.02 * side))
    field = coarse + 0.3 * ragged
    # Taper towards the borders so tissue is not cut by the slide edge.
    ramp = 0.12 * side
    dy = np.minimum(np.arange(h), np.arange(h)[::-1]) / ramp
    dx = np.minimum(np.arange(w), np.arange(w)[::-1]) / ramp
    field -= 6.0 * (1.0 - np.clip(np.minimum.outer(dy, dx), 0, 1)).astype(np.float32)
    threshold = np.quantile(field, 1.0 - fraction)
    return np.clip((field - threshold) / 0.12 + 0.5, 0.0, 1.0).astype(np.float32)


def _place_regions(
    rng: np.random.Generator, tissue_lr: np.ndarray, cfg: SynthConfig, width: int, height: int
) -> list[Rect]:
    """Rectangles lying wholly inside tissue (with a margin) and apart from each other.

    The drawn tumour area is shared over the drawn number of regions. A
    rectangle that fits nowhere is shrunk (not below ``min_region_side``), and
    the area it gave up goes to further regions, up to the configured maximum.
    """
    tissue = tissue_lr > 0.5
    free = binary_erosion(tissue, iterations=2)
    remaining = rng.uniform(*cfg.tumour_fraction) * float(tissue.sum()) * _LR * _LR
    min_area = cfg.min_region_side**2
    most = cfg.regions_per_positive[1]
    n_regions = int(rng.integers(cfg.regions_per_positive[0], most + 1))
    n_regions = max(1, min(n_regions, int(remaining // min_area)))
    rects: list[Rect] = []
    while len(rects) < most and (not rects or remaining >= 0.5 * min_area):
        share = remaining / max(n_regions - len(rects), 1)
        placed = _place_one(rng, free, share / _LR**2, math.ceil(cfg.min_region_side / _LR))
        if placed is None:
            break
        y, x, h, w = placed
        taken = np.zeros_like(free)
        taken[y : y + h, x : x + w] = True
        free &= ~binary_dilation(taken, iterations=_REGION_GAP)
        remaining -= w * h * _LR**2
        rects.append((x * _LR, y * _LR, w * _LR, h * _LR))
    # Clip to the slide (the low-res grid rounds up); the taper keeps tissue off the edges anyway.
    return [(x, y, min(w, width - x), min(h, height - y)) for x, y, w, h in rects]


def _place_one(
    rng: np.random.Generator, free: np.ndarray, area: float, min_side: int
) -> tuple[int, int, int, int] | None:
    """(row, col, height, width) on the low-res grid of a random rectangle of about ``area``
    cells inside ``free``, shrunk as needed down to ``min_side``; None if even that fits nowhere."""
    aspect = rng.uniform(0.67, 1.5)
    rw, rh = math.sqrt(area * aspect), math.sqrt(area / aspect)
    scale = max(min_side / rw, min_side / rh, 1.0)  # keep the aspect when growing to the minimum
    rw, rh = rw * scale, rh * scale
    while True:
        w, h = max(min_side, round(rw)), max(min_side, round(rh))
        corners = _fitting_corners(free, w, h)
        if len(corners):
            y, x = corners[rng.integers(len(corners))]
            return int(y), int(x), h, w
        if w == min_side and h == min_side:
            return None
        rw, rh = rw * 0.85, rh * 0.85


def _fitting_corners(mask: np.ndarray, w: int, h: int) -> np.ndarray:
    """(row, col) of every top-left corner where an h × w window lies wholly inside ``mask``."""
    if h > mask.shape[0] or w > mask.shape[1]:
        return np.empty((0, 2), int)
    ii = np.pad(integral_image(mask.astype(np.int32)), ((1, 0), (1, 0)))
    sums = ii[h:, w:] - ii[:-h, w:] - ii[h:, :-w] + ii[:-h, :-w]
    return np.argwhere(sums == w * h)


# --------------------------------------------------------------------------------------------------
# Pixels
# --------------------------------------------------------------------------------------------------
@cache
def _nucleus_template(ry: int, rx: int, angle_bin: int) -> np.ndarray:
    """A soft elliptical nucleus (peak 1) with a fixed chromatin grain, deterministic per shape."""
    half = max(ry, rx) + 3
    t = np.zeros((2 * half + 1, 2 * half + 1), np.float32)
    rr, cc = ellipse(half, half, ry, rx, shape=t.shape, rotation=angle_bin * np.pi / _ANGLE_BINS)
    t[rr, cc] = 1.0
    t = gaussian_filter(t, 0.8)
    grain = np.random.default_rng([ry, rx, angle_bin]).uniform(0.75, 1.0, t.shape).astype(np.float32)
    t = t * gaussian_filter(grain, 0.6)
    t /= t.max()
    t.setflags(write=False)
    return t


def _stamp_nuclei(
    canvas: np.ndarray,
    ys: np.ndarray,
    xs: np.ndarray,
    ry: np.ndarray,
    rx: np.ndarray,
    angle: np.ndarray,
    stain: np.ndarray,
) -> None:
    """Draw nuclei into the quantised hematoxylin map; overlaps merge (max), as crowded nuclei look."""
    height, width = canvas.shape
    levels = stain * _H_LEVELS_PER_OD
    for y, x, a, b, ang, q in zip(
        ys.tolist(), xs.tolist(), ry.tolist(), rx.tolist(), angle.tolist(), levels.tolist(), strict=True
    ):
        t = _nucleus_template(a, b, ang)
        half = t.shape[0] // 2
        y0, x0 = y - half, x - half
        cy0, cx0 = max(y0, 0), max(x0, 0)
        cy1, cx1 = min(y0 + t.shape[0], height), min(x0 + t.shape[1], width)
        if cy1 <= cy0 or cx1 <= cx0:
            continue
        region = canvas[cy0:cy1, cx0:cx1]
        stamp = (t[cy0 - y0 : cy1 - y0, cx0 - x0 : cx1 - x0] * q + 0.5).astype(np.uint8)
        np.maximum(region, stamp, out=region)


# Stain concentrations are drawn quantised to uint8 and turned into colour through a
# 256 × 256 lookup table: per-pixel float Beer-Lambert (or skimage.color.combine_stains,
# which works in float64) costs several times more than the rest of a slide together.
_H_MAX, _E_MAX = 2.0, 1.2  # concentrations mapped to level 255
_H_LEVELS_PER_OD = 255 / _H_MAX
_E_LEVELS_PER_OD = 255 / _E_MAX


def _colour_lut(stain: Stain, h_gain: float, e_gain: float) -> np.ndarray:
    """RGBA (packed uint32, native order) for every (hematoxylin, eosin) level pair.

    Beer-Lambert: I = I0 · exp(-(H·h + E·e)). Nuclei displace eosin, so E is
    reduced where H is high (up to 70 %), which keeps nuclei purple, not mauve.
    """
    h = np.arange(256, dtype=np.float64)[:, None] / _H_LEVELS_PER_OD
    e = np.arange(256, dtype=np.float64)[None, :] / _E_LEVELS_PER_OD
    e = e * (1.0 - 0.7 * np.minimum(h, 1.0)) * e_gain
    h = h * h_gain
    od = h[..., None] * np.array(stain.h) + e[..., None] * np.array(stain.e)
    rgb = np.clip(np.array(stain.background) * np.exp(-od) + 0.5, 0, 255).astype(np.uint8)
    rgba = np.concatenate([rgb, np.full((256, 256, 1), 255, np.uint8)], axis=-1)
    return rgba.reshape(-1, 4).view(np.uint32).ravel()


def _resize(a: np.ndarray, width: int, height: int) -> np.ndarray:
    """Bilinear resize of a 2-D float32 or uint8 array (PIL: several times faster than ndimage.zoom)."""
    return np.asarray(
        Image.fromarray(np.ascontiguousarray(a)).resize((width, height), Image.Resampling.BILINEAR)
    )


def render_slide(plan: SlidePlan, cfg: SynthConfig, stain: Stain) -> tuple[Image.Image, list[Rect]]:
    """Level-0 RGB image of one slide and its planted rectangles (empty for label 0)."""
    rng = np.random.default_rng(np.random.SeedSequence(list(plan.seed)))
    width, height = plan.width, plan.height
    lr_shape = (math.ceil(height / _LR), math.ceil(width / _LR))
    fraction = rng.uniform(*cfg.tissue_fraction)
    for _ in range(_MAX_TISSUE_ATTEMPTS):
        tissue_lr = _tissue_field(rng, lr_shape, fraction)
        rects = _place_regions(rng, tissue_lr, cfg, width, height) if plan.label else []
        if rects or not plan.label:
            break
    else:
        raise RuntimeError(f"{plan.slide_id}: no room for a planted region; raise size_range")

    # Eosin (stroma): wavy fibres whose orientation drifts across the slide, and patchy
    # staining; built on a grid _FIBRE_DS times coarser than level 0, then upsampled.
    fs_h, fs_w = math.ceil(height / _FIBRE_DS), math.ceil(width / _FIBRE_DS)
    along_x = _unit(gaussian_filter(rng.standard_normal((fs_h, fs_w), np.float32), (0.8, 4.0)))
    along_y = _unit(gaussian_filter(rng.standard_normal((fs_h, fs_w), np.float32), (4.0, 0.8)))
    mix = np.clip(_unit(gaussian_filter(rng.standard_normal(lr_shape, np.float32), 6)) + 0.5, 0, 1)
    patchy = _unit(gaussian_filter(rng.standard_normal(lr_shape, np.float32), 4))
    mix = _resize(mix, fs_w, fs_h)
    base = _resize(tissue_lr * (1.0 + 0.08 * patchy), fs_w, fs_h)
    eosin = base * (0.42 * (1.0 + 0.3 * (mix * along_x + (1.0 - mix) * along_y)))
    eosin_q = np.clip(eosin * _E_LEVELS_PER_OD + 0.5, 0, 255).astype(np.uint8)
    eosin_q = np.array(_resize(eosin_q, width, height))
    haem_q = np.zeros((height, width), np.uint8)

    # Normal tissue: sparse small nuclei, mostly spindle-shaped (fibroblasts), some round (lymphocytes).
    n = rng.poisson(width * height / 800)
    ys, xs = rng.integers(0, height, n), rng.integers(0, width, n)
    keep = tissue_lr[ys // _LR, xs // _LR] > 0.6
    for x, y, w, h in rects:
        keep &= ~((xs >= x) & (xs < x + w) & (ys >= y) & (ys < y + h))
    ys, xs = ys[keep], xs[keep]
    n = len(ys)
    spindle = rng.random(n) < 0.7
    ry = np.where(spindle, rng.integers(2, 4, n), rng.integers(3, 5, n))
    rx = np.where(spindle, rng.integers(5, 9, n), ry + rng.integers(0, 2, n))
    _stamp_nuclei(haem_q, ys, xs, ry, rx, rng.integers(0, _ANGLE_BINS, n), rng.uniform(0.65, 1.0, n))

    # Planted tumour: sheets of crowded, large, dark, pleomorphic nuclei on a purplish cytoplasm.
    spacing = 21.0
    for x, y, w, h in rects:
        gy = np.arange(y + spacing / 2, y + h, spacing * 0.866)
        gx = np.arange(x + spacing / 2, x + w, spacing)
        cy, cx = np.meshgrid(gy, gx, indexing="ij")
        cx = cx + (np.arange(len(gy))[:, None] % 2) * spacing / 2  # hexagonal packing
        cy, cx = cy.ravel(), cx.ravel()
        m = len(cy)
        cy = np.clip(np.rint(cy + rng.uniform(-4, 4, m)), y, y + h - 1).astype(int)
        cx = np.clip(np.rint(cx + rng.uniform(-4, 4, m)), x, x + w - 1).astype(int)
        keep = rng.random(m) > 0.08
        cy, cx, m = cy[keep], cx[keep], int(keep.sum())
        giant = (rng.random(m) < 0.1) * rng.integers(3, 6, m)
        ry = rng.integers(6, 10, m) + giant
        rx = rng.integers(7, 12, m) + giant
        c = cfg.tumour_contrast  # 1: the default look; lower: paler, closer to normal tissue
        eosin_q[y : y + h, x : x + w] = (eosin_q[y : y + h, x : x + w] * (1 - 0.35 * c)).astype(np.uint8)
        haem_q[y : y + h, x : x + w] = round(0.15 * c * _H_LEVELS_PER_OD)  # cytoplasm
        angles, darkness = rng.integers(0, _ANGLE_BINS, m), rng.uniform(1.1, 1.5, m)
        if c != 1.0:
            darkness = 0.8 + (darkness - 0.8) * c  # normal nuclei are 0.65-1.0
        _stamp_nuclei(haem_q, cy, cx, ry, rx, angles, darkness)

    lut = _colour_lut(stain, stain.h_gain * rng.uniform(0.95, 1.05), stain.e_gain * rng.uniform(0.93, 1.07))
    index = haem_q.astype(np.uint16)
    index <<= 8
    index |= eosin_q
    rgba = lut[index].view(np.uint8).reshape(height, width, 4)
    return Image.fromarray(rgba, "RGBA").convert("RGB"), rects
