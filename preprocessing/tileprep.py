"""What happens to a slide's tiles between reading and the encoder: QC, stain normalisation, jitter.

One picklable object per slide (:class:`TilePrep`), carried by its :class:`~.tilestream.SlideJob`
to whichever process reads the tiles (a loader worker, or the main process between forwards),
so QC and colour work run beside the model instead of in front of it, and each tile is read
once. Order, and why:

1. QC measures on the tiles *as scanned* (:func:`.artifacts.tile_qc`): normalisation would
   change the saturation and hue the pen and fold tests rely on.
2. Tiles failing a threshold are dropped here: they never reach the encoder.
3. The kept tiles are stain-normalised with the slide's own estimate (:class:`.stain.SlideStain`),
   then HED-jittered with a per-tile seed (:func:`.stain.tile_rng`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .artifacts import SlideReference, qc_reasons, tile_qc
from .params import QCParams, TissueParams
from .stain import SlideStain, hed_jitter, tile_rng

__all__ = ["PrepResult", "TilePrep", "sample_indices"]


@dataclass(frozen=True)
class PrepResult:
    tiles: np.ndarray  #: uint8 (k, H, W, 3), the kept tiles, normalised
    reasons: np.ndarray  #: uint8 (n,) exclusion bits of every tile read (0: kept)
    measures: dict[str, np.ndarray]  #: float32 (n,) per measure, every tile read


@dataclass(frozen=True)
class TilePrep:
    """QC (``qc`` None: no measures, nothing excluded), stain mapping and jitter of one slide's tiles."""

    slide_id: str
    reference: SlideReference | None = None
    tissue: TissueParams = TissueParams()
    qc: QCParams | None = None
    stain: SlideStain | None = None
    jitter: float = 0.0
    seed: int = 0

    def __call__(self, coords: np.ndarray, tiles: np.ndarray) -> PrepResult:
        n = len(tiles)
        if self.qc is not None and self.reference is not None and n:
            measures = tile_qc(tiles, self.reference, self.tissue, self.qc)
            reasons = qc_reasons(measures, self.qc, self.reference)
        else:
            measures, reasons = {}, np.zeros(n, np.uint8)
        keep = reasons == 0
        kept = tiles[keep] if not keep.all() else tiles
        if self.stain is not None and len(kept):
            kept = self.stain(kept)
        if self.jitter and len(kept):
            sigma = self.jitter
            kept = np.stack([hed_jitter(t, tile_rng(self.seed, self.slide_id, x, y), sigma, sigma / 5)
                             for t, (x, y) in zip(kept, np.asarray(coords)[keep], strict=True)])
        return PrepResult(np.ascontiguousarray(kept), reasons, measures)


def sample_indices(n: int, k: int = 32) -> np.ndarray:
    """Up to ``k`` tile indices spread evenly over ``n`` tiles (the slide's sample for references)."""
    if n <= k:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, k).round().astype(np.int64))
