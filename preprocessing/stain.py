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

How the pipeline uses it: :func:`stain_reference` once per run (a reference image, or the
built-in one), then per slide :meth:`SlideStain.fit` on a sample of the slide's tiles, so each
slide is mapped with *its own* stain estimate (per-tile estimates would also equalise the
biology: a tile of nuclei and a tile of stroma would come out the same colour). The slide's
tiles are mapped in the loader's workers before the encoder. :func:`provenance_record` gives the
``stain`` attribute (method, reference digest, jitter) that training compares across sites.

Built-in reference: for Macenko, the H&E vectors and 99th-percentile concentrations published
by Macenko et al. (torchstain's defaults); for Reinhard, the CIE-Lab statistics of
:func:`default_reference`, a tile mixed from those vectors by Beer–Lambert.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from skimage.color import hed2rgb, lab2rgb, rgb2hed, rgb2lab

from .errors import InputError
from .params import StainParams

__all__ = ["MACENKO_REFERENCE", "MacenkoNormalizer", "ReinhardNormalizer", "SlideStain", "default_reference",
           "hed_jitter", "load_reference", "provenance_record", "stain_angles_deg", "stain_reference", "tile_rng"]

#: Macenko et al.'s reference H&E optical-density vectors (columns) and 99th-percentile
#: concentrations, as torchstain ships them.
MACENKO_REFERENCE = {
    "stain_matrix": np.array([[0.5626, 0.2159], [0.7201, 0.8012], [0.4062, 0.5581]]),
    "max_concentrations": np.array([1.9705, 1.0308]),
}


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


def default_reference(size: int = 256, io: int = 240) -> np.ndarray:
    """The built-in reference tile: Beer–Lambert mix of :data:`MACENKO_REFERENCE` (seeded, so fixed).

    Nuclei (haematoxylin), stroma (eosin), mixtures and a little glass, with concentrations up
    to the published maxima.
    """
    rng = np.random.default_rng(0)
    n = size * size
    kind = rng.choice(4, n, p=[0.3, 0.4, 0.2, 0.1])
    cmax = MACENKO_REFERENCE["max_concentrations"]
    c = np.zeros((2, n))
    c[0] = np.where(kind == 0, rng.uniform(0.3, 1.0, n), 0) + np.where(kind == 2, rng.uniform(0.1, 0.6, n), 0)
    c[1] = np.where(kind == 1, rng.uniform(0.3, 1.0, n), 0) + np.where(kind == 2, rng.uniform(0.1, 0.6, n), 0)
    od = MACENKO_REFERENCE["stain_matrix"] @ (c * cmax[:, None])
    return np.clip(io * np.exp(-od).T.reshape(size, size, 3) + 0.5, 0, 255).astype(np.uint8)


def load_reference(path: str | os.PathLike) -> np.ndarray:
    """A reference image as uint8 RGB; InputError naming the file if it cannot serve as one."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    try:
        with Image.open(path) as img:
            rgb = np.asarray(img.convert("RGB"))
    except (OSError, UnidentifiedImageError) as err:
        raise InputError(f"{path}: cannot read the stain reference image ({err})") from err
    if min(rgb.shape[:2]) < 32:
        raise InputError(f"{path}: stain reference image {rgb.shape[1]}x{rgb.shape[0]} px is too small (>= 32x32)")
    return rgb


def stain_reference(params: StainParams) -> MacenkoNormalizer | ReinhardNormalizer | None:
    """The run's reference normaliser (None for ``method == "none"``); InputError for a bad reference."""
    if params.method == "none":
        return None
    image = load_reference(params.reference) if params.reference is not None else None
    if params.method == "macenko":
        norm = MacenkoNormalizer()
        if image is None:
            norm.fitted = True  # torchstain starts out with the published reference
            return norm
        try:
            return norm.fit(image)
        except Exception as err:  # torchstain fails on images without enough stained pixels
            raise InputError(f"{params.reference}: no H&E stain vectors found in the stain reference ({err})") from err
    return ReinhardNormalizer().fit(default_reference() if image is None else image)


def provenance_record(params: StainParams, reference: MacenkoNormalizer | ReinhardNormalizer | None) -> dict:
    """``{"stain": identity, "stain_params": record}`` for the feature file's attributes.

    ``stain`` is short and compared across sites (method, first 16 hex digits of the digest of
    the reference's statistics, jitter); ``stain_params`` is the full record for people.
    """
    record = {"method": "none"} if reference is None else reference.describe()
    identity = "none" if reference is None else f"{record['method']}:{record['reference'][:16]}"
    if params.hed_jitter:
        identity += f"+hed{params.hed_jitter:g}/seed{params.seed}"
        record = {**record, "hed_jitter": params.hed_jitter, "seed": params.seed}
    if params.reference is not None:
        record = {**record, "reference_file": Path(params.reference).name}
    return {"stain": identity, "stain_params": record}


def tile_rng(seed: int, slide_id: str, x: int, y: int) -> np.random.Generator:
    """The generator for one tile's jitter: the same on every run, process and worker."""
    return np.random.default_rng([int(seed), zlib.crc32(slide_id.encode()), int(x) & 0xFFFFFFFF, int(y) & 0xFFFFFFFF])


@dataclass(frozen=True)
class SlideStain:
    """One slide's mapping onto the reference stain: plain numbers, so it travels to loader workers.

    Macenko: the slide's H&E vectors and 99th-percentile concentrations, estimated on a sample
    of its tiles; each pixel's concentrations are scaled to the reference's maxima and re-mixed
    with the reference vectors. Reinhard: the sample's CIE-Lab mean and std are mapped to the
    reference's.
    """

    method: str
    source: dict = field(default_factory=dict)
    target: dict = field(default_factory=dict)
    io: int = 240

    @classmethod
    def fit(cls, reference: MacenkoNormalizer | ReinhardNormalizer, sample: np.ndarray) -> SlideStain:
        """Estimate the slide's stain from ``sample`` (uint8 tiles, (N, H, W, 3)); ValueError if it has none."""
        image = np.asarray(sample, np.uint8).reshape(-1, sample.shape[-2], 3)
        if isinstance(reference, ReinhardNormalizer):
            mean, std = ReinhardNormalizer.lab_stats(image)
            return cls("reinhard", {"mean": mean, "std": std}, {"mean": reference.mean, "std": reference.std})
        try:
            with warnings.catch_warnings(), np.errstate(all="ignore"):
                warnings.simplefilter("ignore", RuntimeWarning)
                src = MacenkoNormalizer(reference.io, reference.alpha, reference.beta).fit(image)
            if not (np.isfinite(src.stain_matrix).all() and np.isfinite(src.max_concentrations).all()):
                raise ValueError("no finite estimate")
        except Exception as err:  # torchstain: too few stained pixels for an eigen-decomposition
            raise ValueError(f"stain: cannot estimate the slide's H&E vectors from its tiles ({err})") from err
        return cls("macenko", {"he": src.stain_matrix, "maxc": src.max_concentrations},
                   {"he": reference.stain_matrix, "maxc": reference.max_concentrations}, reference.io)

    def __call__(self, tiles: np.ndarray) -> np.ndarray:
        """Map uint8 tiles (N, H, W, 3) onto the reference stain."""
        tiles = np.asarray(tiles)
        if self.method == "reinhard":
            lab = rgb2lab(tiles)
            lab = (lab - self.source["mean"]) / np.maximum(self.source["std"], 1e-6) * self.target["std"]
            return (np.clip(lab2rgb(lab + self.target["mean"]), 0, 1) * 255 + 0.5).astype(np.uint8)
        # Least-squares concentrations, scaled to the reference's maxima and re-mixed, as one 3x3 map of
        # optical density (float32: a tile is 50-65 k pixels, precision to spare for uint8 output).
        scale = self.target["maxc"] / np.maximum(self.source["maxc"], 1e-6)
        od_map = (self.target["he"] @ (scale[:, None] * np.linalg.pinv(self.source["he"]))).astype(np.float32)
        od = -np.log((tiles.reshape(-1, 3).astype(np.float32) + 1) / np.float32(self.io))
        out = np.float32(self.io) * np.exp(-(od @ od_map.T))
        return np.clip(out + 0.5, 0, 255).astype(np.uint8).reshape(tiles.shape)
