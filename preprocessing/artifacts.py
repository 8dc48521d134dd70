"""Per-tile quality control: how sharp a tile is, and how much of it is pen ink or tissue fold.

How the pipeline should call this (not wired yet; for :mod:`preprocessing.pipeline`):

1. After the tissue mask, once per slide:
   ``ref = SlideReference.from_mask(tissue_mask.thumbnail, tissue_mask.mask)``.
2. For every batch of tiles read for the encoder (uint8 ``(N, H, W, 3)`` at the target mpp,
   *before* normalisation or augmentation): ``qc = tile_qc(batch, ref, tissue_params, qc_params)``.
   It returns float32 arrays ``blur`` (variance of the Laplacian), ``pen_fraction`` and
   ``fold_fraction``, one value per tile; cheap beside the encoder (~1 ms per 224-px tile).
3. Store them in the slide's HDF5 beside ``coords`` as per-tile datasets
   ``qc/blur``, ``qc/pen_fraction``, ``qc/fold_fraction`` (float32, shape ``(N,)``), so
   thresholds can be changed later without re-reading the slide.
4. If ``qc_params`` sets thresholds, drop the excluded tiles *before* feature extraction with
   ``keep = qc_keep(qc, qc_params)`` (features, coords and QC datasets all indexed by it) and
   write the number dropped per reason (``qc_excluded``: ``{"blur": n, "pen": n, "fold": n}``).
5. Record ``dataclasses.asdict(qc_params)`` under ``provenance["qc"]`` (with ``TissueParams``,
   which already carries the ``pen_*`` settings), so runs with different thresholds are told
   apart and a federation can refuse a mismatch.
6. In the QC image (:func:`preprocessing.qc.render_qc`) outline excluded tiles in another colour
   and paint the ink mask (:func:`preprocessing.tissue.ink_mask`) on the thumbnail.

Measures
--------
* **Blur**: variance of the 4-neighbour Laplacian of the grey tile (ITU-R 601 luma, 0-255).
  Focus blur removes high spatial frequencies, which the Laplacian measures (Pech-Pacheco et
  al. 2000; HistoQC's blurriness check). It is not normalised, so a threshold is per scanner;
  on the synthetic cohort blurred patches score ~10× lower than sharp tissue.
* **Pen**: fraction of the (pooled) tile's pixels that are coloured ink
  (:func:`preprocessing.tissue.ink_mask`, same ``TissueParams``) or near-black
  (``black_level``): the same rule that removes ink from the tissue mask.
* **Fold**: a folded section lies double, so its optical density doubles: it is *more
  saturated* and darker than the slide's own tissue *in the same hue*. A pixel of the tile
  pooled to ~8 µm/px (the scale of the reference) is fold when its HSV saturation is at least
  ``fold_saturation_ratio`` × the slide's median tissue saturation, its grey level at most
  ``fold_brightness_ratio`` × the slide's median tissue grey, its hue within
  ``fold_max_hue_shift`` of the tissue's mean hue, and it is not ink. Relative to the slide, so
  a site's stain strength does not move it. Dense tumour is darker but bluer (haematoxylin), so
  the hue test keeps it out (measured: tumour tiles ~2 % "fold" vs ~50 % in fold boxes). A
  heuristic: strongly eosinophilic regions (e.g. muscle, haemorrhage) can trip it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .params import QCParams, TissueParams
from .tissue import _extremes, _hue_deg, _saturation, ink_mask

DEFAULT_QC = QCParams()

__all__ = ["DEFAULT_QC", "SlideReference", "fold_fraction", "laplacian_variance", "pen_fraction", "qc_keep", "tile_qc"]


@dataclass(frozen=True)
class SlideReference:
    """The slide's typical tissue, against which folds are judged: median saturation and grey (0-255)."""

    saturation: float
    grey: float
    hue: float  # circular mean of the tissue's HSV hue, degrees

    @classmethod
    def from_mask(cls, thumbnail: np.ndarray, mask: np.ndarray) -> SlideReference:
        px = thumbnail[mask] if mask.any() else thumbnail.reshape(-1, 3)
        mx, mn = _extremes(px)
        angle = np.deg2rad(_hue_deg(px, mx, mn))
        hue = float(np.rad2deg(np.arctan2(np.sin(angle).mean(), np.cos(angle).mean())) % 360)
        return cls(saturation=float(np.median(_saturation(mx, mn))), grey=float(np.median(_grey(px))), hue=hue)


def _grey(rgb: np.ndarray) -> np.ndarray:
    rgb = rgb.astype(np.float32)
    return 0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]


def _batch(tiles: np.ndarray) -> np.ndarray:
    tiles = np.asarray(tiles)
    if tiles.ndim == 3:
        tiles = tiles[None]
    if tiles.ndim != 4 or tiles.shape[-1] != 3 or tiles.dtype != np.uint8:
        raise ValueError(f"expected uint8 tiles (N, H, W, 3), got {tiles.dtype} {tiles.shape}")
    return tiles


def _pool(tiles: np.ndarray, k: int) -> np.ndarray:
    """Average-pool (N, H, W, 3) uint8 by ``k`` (edges that do not fill a block are dropped)."""
    if k <= 1:
        return tiles
    n, h, w, _ = tiles.shape
    if h < k or w < k:
        return tiles
    h, w = h // k * k, w // k * k
    blocks = tiles[:, :h, :w].reshape(n, h // k, k, w // k, k, 3).astype(np.float32).mean(axis=(2, 4))
    return (blocks + 0.5).astype(np.uint8)


def laplacian_variance(tiles: np.ndarray) -> np.ndarray:
    """(N,) float32 variance of the 4-neighbour Laplacian of each tile's grey image (higher = sharper)."""
    g = _grey(_batch(tiles))
    if g.shape[1] < 3 or g.shape[2] < 3:
        return np.zeros(len(g), np.float32)
    lap = g[:, :-2, 1:-1] + g[:, 2:, 1:-1] + g[:, 1:-1, :-2] + g[:, 1:-1, 2:] - 4 * g[:, 1:-1, 1:-1]
    return lap.reshape(len(g), -1).var(axis=1).astype(np.float32)


def _ink(pooled: np.ndarray, tissue: TissueParams) -> np.ndarray:
    flat = pooled.reshape(-1, pooled.shape[-2], 3)
    ink = ink_mask(flat, tissue)
    ink |= _extremes(flat)[0] <= tissue.black_level
    return ink.reshape(pooled.shape[:-1])


def pen_fraction(tiles: np.ndarray, tissue: TissueParams = TissueParams(), qc: QCParams = DEFAULT_QC) -> np.ndarray:
    """(N,) float32 fraction of each tile (pooled by ``qc.pool``) that is pen ink or near-black."""
    pooled = _pool(_batch(tiles), qc.pool)
    return _ink(pooled, tissue).reshape(len(pooled), -1).mean(axis=1).astype(np.float32)


def fold_fraction(
    tiles: np.ndarray, ref: SlideReference, tissue: TissueParams = TissueParams(), qc: QCParams = DEFAULT_QC
) -> np.ndarray:
    """(N,) float32 fraction of each tile (pooled) that looks folded against the slide's ``ref``."""
    pooled = _pool(_batch(tiles), qc.fold_pool)
    mx, mn = _extremes(pooled)
    fold = _saturation(mx, mn) >= qc.fold_saturation_ratio * max(ref.saturation, 1.0)
    fold &= _grey(pooled) <= qc.fold_brightness_ratio * ref.grey
    shift = np.abs((_hue_deg(pooled, mx, mn) - ref.hue + 180.0) % 360.0 - 180.0)
    fold &= shift <= qc.fold_max_hue_shift
    fold &= ~_ink(pooled, tissue)
    return fold.reshape(len(pooled), -1).mean(axis=1).astype(np.float32)


def tile_qc(
    tiles: np.ndarray, ref: SlideReference, tissue: TissueParams = TissueParams(), qc: QCParams = DEFAULT_QC
) -> dict[str, np.ndarray]:
    """All per-tile measures of a batch: ``{"blur", "pen_fraction", "fold_fraction"}``, each (N,) float32."""
    tiles = _batch(tiles)
    return {
        "blur": laplacian_variance(tiles),
        "pen_fraction": pen_fraction(tiles, tissue, qc),
        "fold_fraction": fold_fraction(tiles, ref, tissue, qc),
    }


def qc_keep(measures: dict[str, np.ndarray], qc: QCParams) -> np.ndarray:
    """(N,) bool: the tiles no set threshold excludes (all True when ``qc`` sets none)."""
    keep = np.ones(len(measures["blur"]), bool)
    if qc.min_sharpness is not None:
        keep &= measures["blur"] >= qc.min_sharpness
    if qc.max_pen_fraction is not None:
        keep &= measures["pen_fraction"] <= qc.max_pen_fraction
    if qc.max_fold_fraction is not None:
        keep &= measures["fold_fraction"] <= qc.max_fold_fraction
    return keep
