"""Per-tile quality control: how sharp a tile is, and how much of it is pen ink or tissue fold.

How the pipeline uses this (:mod:`preprocessing.tileprep`, :mod:`preprocessing.pipeline`):

1. Once per slide, after the tissue mask: ``SlideReference.from_mask(thumbnail, mask)``, then
   :meth:`SlideReference.with_sharpness` on a sample of the slide's tiles (the blur threshold is
   relative to the slide's median sharpness).
2. For every batch of tiles read for the encoder (uint8 ``(N, H, W, 3)`` at the target mpp,
   *before* stain normalisation or augmentation): :func:`tile_qc` gives float32 ``blur``,
   ``pen_fraction``, ``fold_fraction`` (~1 ms per 224-px tile, read in the loader's workers), and
   :func:`qc_reasons` a bit mask per tile (:data:`REASONS`); excluded tiles never reach the encoder.
3. The measures of kept tiles go into the feature file's ``qc/`` group, the excluded tiles'
   coordinates, reasons and measures into ``qc_excluded/`` (:mod:`preprocessing.h5format`), the
   thresholds into the ``qc_params`` attribute, and the QC image outlines excluded tiles by reason.

Measures
--------
* **Blur**: variance of the 4-neighbour Laplacian of the grey tile (ITU-R 601 luma, 0-255),
  over tissue pixels only (glass has no texture, and a tissue edge is sharp even when blurred).
  Focus blur removes high spatial frequencies, which the Laplacian measures (Pech-Pacheco et
  al. 2000; HistoQC's blurriness check). It is not normalised, so a threshold is per scanner;
  on the synthetic cohort blurred patches score ~10× lower than sharp tissue.
* **Pen**: fraction of the (pooled) tile's pixels that are coloured ink
  (:func:`preprocessing.tissue.ink_mask`, same ``TissueParams``) or near-black
  (``black_level``): the same rule that removes ink from the tissue mask, plus dark grey
  (``QCParams.pen_dark_level``/``pen_dark_saturation``: black marker is often ~50-60, above
  ``black_level``, and at tile scale it is no longer diluted by the mask's coarser pixels).
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

from dataclasses import dataclass, replace

import numpy as np

from .params import QCParams, TissueParams
from .tissue import _extremes, _hue_deg, _saturation, ink_mask

DEFAULT_QC = QCParams()

#: Exclusion reasons, as bits of :func:`qc_reasons` (a tile may fail several).
REASONS = {"blur": 1, "pen": 2, "fold": 4}

__all__ = ["DEFAULT_QC", "REASONS", "SlideReference", "fold_fraction", "laplacian_variance", "pen_fraction",
           "qc_keep", "qc_reasons", "tile_qc"]


@dataclass(frozen=True)
class SlideReference:
    """The slide's typical tissue, against which folds are judged: median saturation and grey (0-255)."""

    saturation: float
    grey: float
    hue: float  # circular mean of the tissue's HSV hue, degrees
    sharpness: float = 0.0  # median Laplacian variance of a sample of the slide's tiles (0: not measured)

    @classmethod
    def from_mask(cls, thumbnail: np.ndarray, mask: np.ndarray) -> SlideReference:
        px = thumbnail[mask] if mask.any() else thumbnail.reshape(-1, 3)
        mx, mn = _extremes(px)
        angle = np.deg2rad(_hue_deg(px, mx, mn))
        hue = float(np.rad2deg(np.arctan2(np.sin(angle).mean(), np.cos(angle).mean())) % 360)
        return cls(saturation=float(np.median(_saturation(mx, mn))), grey=float(np.median(_grey(px))), hue=hue)

    def with_sharpness(self, sample: np.ndarray, white_level: int = TissueParams().white_level) -> SlideReference:
        """This reference with ``sharpness`` measured on ``sample`` (uint8 tiles at the target mpp).

        A sample rather than all tiles, because tiles are excluded before they are embedded, i.e.
        before the slide's own median is known; a few dozen spread over the slide give it closely.
        """
        if len(sample) == 0:
            return self
        return replace(self, sharpness=float(np.median(laplacian_variance(sample, white_level))))


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


def laplacian_variance(tiles: np.ndarray, white_level: int | None = None) -> np.ndarray:
    """(N,) float32 variance of the 4-neighbour Laplacian of each tile's grey image (higher = sharper).

    With ``white_level``, only where the whole stencil is tissue (some channel below it): the
    edge of tissue against glass is as sharp in a blurred tile as in a focused one, and glass
    itself has no texture, so a tile half on glass would otherwise look blurred. Tiles with
    under 10 % such pixels fall back to the whole tile.
    """
    tiles = _batch(tiles)
    g = _grey(tiles)
    if g.shape[1] < 3 or g.shape[2] < 3:
        return np.zeros(len(g), np.float32)
    lap = g[:, :-2, 1:-1] + g[:, 2:, 1:-1] + g[:, 1:-1, :-2] + g[:, 1:-1, 2:] - 4 * g[:, 1:-1, 1:-1]
    lap = lap.reshape(len(g), -1)
    if white_level is None:
        return lap.var(axis=1).astype(np.float32)
    t = _extremes(tiles)[1] < white_level
    m = (t[:, :-2, 1:-1] & t[:, 2:, 1:-1] & t[:, 1:-1, :-2] & t[:, 1:-1, 2:] & t[:, 1:-1, 1:-1]).reshape(len(g), -1)
    n = m.sum(axis=1)
    use = n >= 0.1 * m.shape[1]
    mean = np.where(use, (lap * m).sum(axis=1) / np.maximum(n, 1), lap.mean(axis=1))
    sq = np.where(use, (lap * lap * m).sum(axis=1) / np.maximum(n, 1), (lap * lap).mean(axis=1))
    return np.maximum(sq - mean * mean, 0).astype(np.float32)


def _ink(pooled: np.ndarray, tissue: TissueParams, qc: QCParams) -> np.ndarray:
    flat = pooled.reshape(-1, pooled.shape[-2], 3)
    mx, mn = _extremes(flat)
    sat = _saturation(mx, mn)
    ink = ink_mask(flat, tissue, sat)
    ink |= mx <= tissue.black_level
    ink |= (mx <= qc.pen_dark_level) & (sat <= qc.pen_dark_saturation * 255)
    return ink.reshape(pooled.shape[:-1])


def pen_fraction(tiles: np.ndarray, tissue: TissueParams = TissueParams(), qc: QCParams = DEFAULT_QC) -> np.ndarray:
    """(N,) float32 fraction of each tile (pooled by ``qc.pool``) that is pen ink or near-black."""
    pooled = _pool(_batch(tiles), qc.pool)
    return _ink(pooled, tissue, qc).reshape(len(pooled), -1).mean(axis=1).astype(np.float32)


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
    fold &= ~_ink(pooled, tissue, qc)
    return fold.reshape(len(pooled), -1).mean(axis=1).astype(np.float32)


def tile_qc(
    tiles: np.ndarray, ref: SlideReference, tissue: TissueParams = TissueParams(), qc: QCParams = DEFAULT_QC
) -> dict[str, np.ndarray]:
    """All per-tile measures of a batch: ``{"blur", "pen_fraction", "fold_fraction"}``, each (N,) float32."""
    tiles = _batch(tiles)
    return {
        "blur": laplacian_variance(tiles, tissue.white_level),
        "pen_fraction": pen_fraction(tiles, tissue, qc),
        "fold_fraction": fold_fraction(tiles, ref, tissue, qc),
    }


def qc_reasons(measures: dict[str, np.ndarray], qc: QCParams, ref: SlideReference | None = None) -> np.ndarray:
    """(N,) uint8 bit mask of the thresholds each tile fails (:data:`REASONS`); 0 = kept.

    Nothing is excluded when ``qc.enabled`` is False. The relative blur threshold needs
    ``ref.sharpness`` (skipped when the reference has none).
    """
    blur = np.asarray(measures["blur"])
    reasons = np.zeros(len(blur), np.uint8)
    if not qc.enabled:
        return reasons
    too_blurred = np.zeros(len(blur), bool)
    if qc.min_sharpness is not None:
        too_blurred |= blur < qc.min_sharpness
    if qc.min_sharpness_ratio is not None and ref is not None and ref.sharpness > 0:
        too_blurred |= blur < qc.min_sharpness_ratio * ref.sharpness
    reasons[too_blurred] |= REASONS["blur"]
    if qc.max_pen_fraction is not None:
        reasons[np.asarray(measures["pen_fraction"]) > qc.max_pen_fraction] |= REASONS["pen"]
    if qc.max_fold_fraction is not None:
        reasons[np.asarray(measures["fold_fraction"]) > qc.max_fold_fraction] |= REASONS["fold"]
    return reasons


def qc_keep(measures: dict[str, np.ndarray], qc: QCParams, ref: SlideReference | None = None) -> np.ndarray:
    """(N,) bool: the tiles no threshold excludes (see :func:`qc_reasons`)."""
    return qc_reasons(measures, qc, ref) == 0


def reason_names(bits: int) -> list[str]:
    """The names of the reasons set in ``bits``."""
    return [name for name, bit in REASONS.items() if bits & bit]
