"""Stain normalisation (Macenko, Reinhard) and stain augmentation (HED jitter) of uint8 RGB tiles.

Hospitals stain and scan differently, and an encoder sees those colour differences as
strongly as the biology. Normalisation maps every tile to one reference's stain; jitter
instead randomises stain during training so a model cannot rely on it. Which one a site
used, and against which reference, changes every feature, so :meth:`describe` gives a
provenance record (method, library, and a SHA-256 of the reference statistics) that a
federation compares before it accepts a site's features.

* **Macenko** (Macenko et al., ISBI 2009): the two H&E optical-density vectors are the
  extreme angles of the tissue's OD in the plane of its two main components; each
  tile's concentrations are re-mixed with the reference's vectors and scaled to the
  reference's 99th-percentile concentrations. Done by ``torchstain`` (its NumPy
  backend, which works on uint8 tiles as they are).
* **Reinhard** (Reinhard et al., 2001): each CIE-Lab channel's mean and standard
  deviation are matched to the reference's. Implemented here with scikit-image,
  because torchstain's version casts ``lab2rgb`` output to uint8 without clipping
  (values just above 1.0 wrap to black).
* **HED jitter** (Tellez et al., 2018): in scikit-image's HED space, each channel is
  scaled by ``1 + N(0, sigma_scale)`` and shifted by ``N(0, sigma_shift)``.

How the pipeline should use it (not wired yet): fit once per consortium on a reference
tile (``MacenkoNormalizer().fit(ref)``), share ``describe()`` with the federation's
policy, apply ``normalize`` to each uint8 tile before the encoder's own transforms, and
record ``describe()`` under ``provenance["stain"]`` (``{"method": "none"}`` without it).
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
from skimage.color import hed2rgb, lab2rgb, rgb2hed, rgb2lab

__all__ = ["MacenkoNormalizer", "ReinhardNormalizer", "hed_jitter", "stain_angles_deg"]


def _digest(values: dict) -> str:
    text = json.dumps({k: np.round(np.asarray(v, np.float64), 6).tolist() for k, v in values.items()}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _check(tile: np.ndarray) -> np.ndarray:
    tile = np.asarray(tile)
    if tile.ndim != 3 or tile.shape[2] != 3 or tile.dtype != np.uint8:
        raise ValueError(f"expected a uint8 (H, W, 3) tile, got {tile.dtype} {tile.shape}")
    return tile


class MacenkoNormalizer:
    """Macenko normalisation via torchstain; ``fit`` on a reference tile, then ``normalize`` tiles."""

    def __init__(self, io: int = 240, alpha: float = 1.0, beta: float = 0.15) -> None:
        from torchstain.numpy.normalizers import NumpyMacenkoNormalizer

        self._impl = NumpyMacenkoNormalizer()
        self.io, self.alpha, self.beta = io, alpha, beta
        self.fitted = False

    def fit(self, reference: np.ndarray) -> MacenkoNormalizer:
        self._impl.fit(_check(reference), Io=self.io, alpha=self.alpha, beta=self.beta)
        self.fitted = True
        return self

    @property
    def stain_matrix(self) -> np.ndarray:
        """(3, 2) unit OD vectors (columns: haematoxylin, eosin) of the reference."""
        return np.asarray(self._impl.HERef, np.float64)

    @property
    def max_concentrations(self) -> np.ndarray:
        return np.asarray(self._impl.maxCRef, np.float64)

    def normalize(self, tile: np.ndarray) -> np.ndarray:
        if not self.fitted:
            raise RuntimeError("MacenkoNormalizer.normalize before fit")
        out, _, _ = self._impl.normalize(_check(tile), Io=self.io, alpha=self.alpha, beta=self.beta, stains=False)
        return out

    def describe(self) -> dict:
        import torchstain

        values = {"stain_matrix": self.stain_matrix, "max_concentrations": self.max_concentrations}
        return {
            "method": "macenko",
            "library": f"torchstain {getattr(torchstain, '__version__', '?')}",
            "reference": _digest(values),
            "io": self.io, "alpha": self.alpha, "beta": self.beta,
            **{k: np.round(v, 6).tolist() for k, v in values.items()},
        }


class ReinhardNormalizer:
    """Reinhard normalisation: match each CIE-Lab channel's mean and std to the reference's."""

    def __init__(self) -> None:
        self.mean: np.ndarray | None = None
        self.std: np.ndarray | None = None

    @staticmethod
    def lab_stats(tile: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        lab = rgb2lab(_check(tile)).reshape(-1, 3)
        return lab.mean(axis=0), lab.std(axis=0)

    def fit(self, reference: np.ndarray) -> ReinhardNormalizer:
        self.mean, self.std = self.lab_stats(reference)
        return self

    def normalize(self, tile: np.ndarray) -> np.ndarray:
        if self.mean is None or self.std is None:
            raise RuntimeError("ReinhardNormalizer.normalize before fit")
        lab = rgb2lab(_check(tile))
        mean, std = lab.reshape(-1, 3).mean(axis=0), lab.reshape(-1, 3).std(axis=0)
        lab = (lab - mean) / np.maximum(std, 1e-6) * self.std + self.mean
        return (np.clip(lab2rgb(lab), 0, 1) * 255 + 0.5).astype(np.uint8)

    def describe(self) -> dict:
        values = {"lab_mean": self.mean, "lab_std": self.std}
        return {"method": "reinhard", "library": "scikit-image", "reference": _digest(values),
                **{k: np.round(v, 6).tolist() for k, v in values.items()}}


def hed_jitter(
    tile: np.ndarray, rng: np.random.Generator, sigma_scale: float = 0.05, sigma_shift: float = 0.01
) -> np.ndarray:
    """One HED-jittered copy of a uint8 tile: per channel ``hed · (1 + N(0, σ_scale)) + N(0, σ_shift)``.

    ``sigma_scale = sigma_shift = 0`` returns the tile unchanged (no round trip through HED,
    which is not exactly invertible in uint8). Deterministic for a seeded ``rng``.
    """
    tile = _check(tile)
    if sigma_scale == 0 and sigma_shift == 0:
        return tile.copy()
    scale = 1.0 + rng.normal(0.0, sigma_scale, 3)
    shift = rng.normal(0.0, sigma_shift, 3)
    hed = rgb2hed(tile) * scale + shift
    return (np.clip(hed2rgb(hed), 0, 1) * 255 + 0.5).astype(np.uint8)


def stain_angles_deg(estimated: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Angle (degrees) between matching columns of two (3, k) stain matrices."""
    e = estimated / np.linalg.norm(estimated, axis=0)
    t = truth / np.linalg.norm(truth, axis=0)
    return np.degrees(np.arccos(np.clip(np.abs((e * t).sum(axis=0)), -1, 1)))
