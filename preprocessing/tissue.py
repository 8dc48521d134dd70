"""Tissue detection: which parts of a slide are worth tiling.

The mask is computed on a low-resolution thumbnail at a fixed *physical*
resolution (:attr:`TissueParams.mask_mpp`), and every size parameter is in µm
or µm², so the same parameters behave the same on a 0.25 µm/px and a
0.5 µm/px scan, and on a 1 mm biopsy and a 25 mm resection.

The recipe is the usual one for H&E (CLAM, HistoQC, histolab), with the
thresholds chosen so that small biopsies survive:

1. HSV saturation, thresholded with Otsu. Stained tissue is coloured, glass is
   grey/white whatever its brightness, so saturation separates them better than
   grey level. The Otsu threshold is clamped to ``[min_saturation,
   max_saturation]``: on a blank slide Otsu would split sensor noise into two
   "classes" (the floor stops that), and on a slide that is nearly all tissue it
   would split pale from dark tissue (the ceiling stops that).
2. Near-white pixels (every channel bright) are background even if slightly
   tinted; near-black pixels (every channel dark: black pen, out-of-focus
   debris, slide-edge shadows) are never tissue.
3. Pen ink is not tissue (:func:`ink_mask`): saturated pixels whose hue lies outside
   H&E's pink-purple range (green, cyan, yellow, sky-blue marker; royal blue and
   blue-violet only when more saturated than any stain) are removed, with a margin for the stroke's pale
   edge, and are left out of the Otsu histogram so heavy marking cannot shift it.
   Black ink is caught by the near-black rule above.
4. Median blur (speckle), morphological closing (join fragmented tissue), an
   optional opening (drop thin strands), removal of regions smaller than
   ``min_region_um2`` and filling of holes smaller than ``max_hole_um2`` (cracks
   and fat are filled, real lumens stay background so the tiling's
   ``min_tissue`` can reject tiles over them).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from skimage import morphology
from skimage.filters import threshold_otsu

from .params import TissueParams
from .slide import Slide

__all__ = ["TissueMask", "TissueParams", "compute_tissue_mask", "detect_tissue", "ink_mask", "saturation_u8"]



@dataclass
class TissueMask:
    """A tissue mask over a whole slide.

    Mask pixel ``(i, j)`` covers level-0 pixels ``[j*dsx, (j+1)*dsx) × [i*dsy, (i+1)*dsy)``;
    the mask spans the slide exactly, so ``mask.shape[1] * dsx == level-0 width``.
    """

    mask: np.ndarray  # bool (H, W)
    downsample: tuple[float, float]  # level-0 px per mask px, (x, y)
    thumbnail: np.ndarray  # the RGB uint8 (H, W, 3) it was computed on, for QC overlays

    @property
    def tissue_fraction(self) -> float:
        """Fraction of the slide's area that is tissue."""
        return float(self.mask.mean()) if self.mask.size else 0.0


def _extremes(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-pixel max and min over R, G, B (elementwise on channel views: ~10× faster than
    ``rgb.max(axis=-1)``, whose length-3 reduction is slow in NumPy)."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    return np.maximum(np.maximum(r, g), b), np.minimum(np.minimum(r, g), b)


def saturation_u8(rgb: np.ndarray) -> np.ndarray:
    """HSV saturation, 0-255 as uint8, ``(max - min) * 255 // max`` (0 where max is 0).

    Integer arithmetic instead of skimage's float64 ``rgb2hsv``: far less memory
    on a 4096² thumbnail, and 8-bit precision is all Otsu needs.
    """
    return _saturation(*_extremes(rgb))


def _saturation(mx: np.ndarray, mn: np.ndarray) -> np.ndarray:
    num = (mx - mn).astype(np.uint16) * np.uint16(255)
    return (num // np.maximum(mx, 1).astype(np.uint16)).astype(np.uint8)


def _hue_deg(rgb: np.ndarray, mx: np.ndarray, mn: np.ndarray) -> np.ndarray:
    """HSV hue in degrees [0, 360) of 1-D arrays of pixels (float32; 0 for grey)."""
    r, g, b = (rgb[..., c].astype(np.float32) for c in range(3))
    d = np.maximum(mx.astype(np.float32) - mn, 1.0)
    hue = np.where(mx == r, ((g - b) / d) % 6.0, np.where(mx == g, (b - r) / d + 2.0, (r - g) / d + 4.0))
    return hue * np.float32(60.0)


def ink_mask(rgb: np.ndarray, params: TissueParams, sat: np.ndarray | None = None) -> np.ndarray:
    """Boolean mask of coloured pen ink in an RGB uint8 image (no margin; black ink excluded).

    Hue is computed only for the pixels saturated enough to be ink, a small part of a
    thumbnail, so this costs little beside the saturation itself.
    """
    if sat is None:
        sat = saturation_u8(rgb)
    out = np.zeros(rgb.shape[:2], bool)
    lowest = min(params.pen_saturation, params.pen_blue_saturation)
    cand = sat >= math.ceil(lowest * 255)
    if not cand.any():
        return out
    px = rgb[cand]
    mx, mn = _extremes(px)
    hue, s = _hue_deg(px, mx, mn), sat[cand]
    coloured = (hue >= params.pen_hue_min) & (hue < params.pen_hue_max) & (s >= params.pen_saturation * 255)
    violet = (hue >= params.pen_hue_max) & (hue < 270.0) & (s >= params.pen_blue_saturation * 255)
    out[cand] = coloured | violet
    return out


def _saturation_threshold(sat: np.ndarray, params: TissueParams, ignore: np.ndarray | None = None) -> int:
    """The 0-255 threshold: fixed if given, else Otsu (over pixels not in ``ignore``) clamped to the
    plausible range."""
    if params.saturation_threshold is not None:
        return round(params.saturation_threshold * 255)
    lo, hi = round(params.min_saturation * 255), round(params.max_saturation * 255)
    counts = np.bincount((sat if ignore is None or not ignore.any() else sat[~ignore]).ravel(), minlength=256)
    if np.count_nonzero(counts) < 2:  # uniform image: Otsu is undefined; glass stays below the floor
        return lo
    otsu = threshold_otsu(hist=(counts, np.arange(256)))
    return int(min(max(math.floor(otsu), lo), hi))


def _disk(radius_um: float, mpp: float) -> np.ndarray | None:
    r = round(radius_um / mpp)
    return morphology.disk(r, dtype=bool) if r >= 1 else None


def detect_tissue(rgb: np.ndarray, params: TissueParams, mpp: float) -> np.ndarray:
    """Boolean tissue mask of an RGB uint8 image whose pixels are ``mpp`` µm wide.

    Pure function of its inputs (no slide access), so it is testable on synthetic
    arrays and reusable on any thumbnail.
    """
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) RGB array, got shape {rgb.shape}")
    if not mpp > 0:
        raise ValueError(f"mpp must be > 0, got {mpp}")
    rgb = np.asarray(rgb, dtype=np.uint8)
    if rgb.shape[0] == 0 or rgb.shape[1] == 0:
        return np.zeros(rgb.shape[:2], bool)
    mx, mn = _extremes(rgb)
    sat = _saturation(mx, mn)
    ink = ink_mask(rgb, params, sat) if params.remove_pen else None
    mask = sat > _saturation_threshold(sat, params, ink)
    mask &= mn < params.white_level
    dark = mx <= params.black_level
    if ink is not None and ink.any():
        if (se := _disk(params.pen_margin_um, mpp)) is not None:
            # Only solid ink (most of its 3 × 3 neighbourhood ink) grows a margin: a stray ink-coloured
            # pixel of pale bluish tissue must not punch a margin-sized hole into it.
            solid = ndimage.uniform_filter(ink.view(np.uint8) * np.uint8(9), size=3, mode="constant") >= 5
            ink |= ndimage.binary_dilation(ink & solid, se)
        dark |= ink
    mask &= ~dark
    del sat, mx, mn, ink

    # Median blur of the binary mask == majority vote in the window, at box-filter cost; since
    # thresholding commutes with the median, for the saturation test this is the same as
    # "median-blur the saturation, then threshold" (as CLAM does).
    size = max(1, round(params.median_um / mpp))
    size += 1 - size % 2
    if size > 1:
        # uint8 0/255 (not float): the mean of the window is > 127 exactly when most votes are 1.
        votes = ndimage.uniform_filter(mask.view(np.uint8) * np.uint8(255), size=size, mode="nearest")
        mask = votes > 127
    if (se := _disk(params.closing_um, mpp)) is not None:
        # Pad so tissue touching the border is not eroded by closing's implicit background.
        pad = se.shape[0] // 2
        mask = ndimage.binary_closing(np.pad(mask, pad, mode="edge"), se)[pad:-pad, pad:-pad]
    if (se := _disk(params.opening_um, mpp)) is not None:
        mask = ndimage.binary_opening(mask, se)
    px_area = mpp * mpp
    min_region = round(params.min_region_um2 / px_area)
    if min_region > 1:
        mask = morphology.remove_small_objects(mask, max_size=min_region - 1, connectivity=2)
    max_hole = round(params.max_hole_um2 / px_area)
    if max_hole > 0:
        mask = morphology.remove_small_holes(mask, max_size=max_hole)
    mask &= ~dark
    return mask


def mask_downsample(dimensions: tuple[int, int], mpp: float, params: TissueParams) -> float:
    """Level-0 px per mask px: ``mask_mpp / mpp``, coarser if the mask would exceed ``max_mask_side``."""
    ds = max(params.mask_mpp / mpp, 1.0)
    return max(ds, max(dimensions) / params.max_mask_side)


def compute_tissue_mask(
    slide: Slide, params: TissueParams = TissueParams(), *, mpp: float | None = None
) -> TissueMask:
    """Tissue mask of a whole slide, computed on a thumbnail at about ``params.mask_mpp``.

    ``mpp`` overrides the slide's level-0 MPP; without it the slide's own is used
    (a :class:`~preprocessing.errors.SlideError` says so if it has none). The
    thumbnail is built block-wise from the best pyramid level, so memory is bounded
    by the mask size, not the slide size.
    """
    mpp = slide.mpp if mpp is None else float(mpp)
    ds = mask_downsample(slide.dimensions, mpp, params)
    # Snap to a pyramid level just finer than the wanted mask (≤ 25 % finer): the thumbnail is
    # then that level as is, without a resampling pass over it.
    level = slide.best_level_for_downsample(ds)
    lw, lh = slide.level_dimensions[level]
    if ds / slide.level_downsamples[level] <= 1.25 and max(lw, lh) <= params.max_mask_side:
        ds = slide.dimensions[0] / lw
    rgb, (dsx, dsy) = slide.thumbnail(ds)
    mask = detect_tissue(rgb, params, mpp * (dsx + dsy) / 2)
    return TissueMask(mask=mask, downsample=(dsx, dsy), thumbnail=rgb)
