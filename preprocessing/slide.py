"""Slide access: one thin layer over OpenSlide that every other module uses.

It exists for three reasons:

* **Clear errors.** Every failure (unopenable file, corrupt tile data, missing
  or implausible MPP) becomes a :class:`SlideError` whose one-line message names
  the file and the problem, so a batch can log it and go on.
* **Physical resolution.** The level-0 microns-per-pixel (MPP) and where it came
  from (the file or the user) travel with the slide handle; see :mod:`.mpp`.
* **Bounded memory.** :meth:`Slide.thumbnail` builds a low-resolution image
  block by block from the best pyramid level, so it never materialises a
  full-resolution level, even for non-pyramidal files opened through
  OpenSlide's ``ImageSlide`` fallback.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import openslide
from PIL import Image

from .errors import SlideError
from .mpp import MppSource, resolve_mpp

__all__ = ["Slide", "SlideError", "SlideInfo", "content_fingerprint", "open_slide", "slide_id_for"]

# Blocks read while building a thumbnail, in pixels of the read level.
_THUMB_BLOCK = 4096
# Bytes hashed at each of the sampled offsets of the content fingerprint.
_FP_CHUNK = 1 << 20
_FP_SAMPLES = 16


def slide_id_for(path: str | os.PathLike) -> str:
    """The slide id used for output names: the file name without its last suffix.

    A DICOM slide is a folder of ``.dcm`` files (one series, one file per level or frame group, as scanners
    export it) whose file names are UIDs or counters that say nothing: its id is the folder's name.
    """
    p = Path(path)
    if p.suffix.lower() == ".dcm":
        return p.absolute().parent.name
    return p.stem


def content_fingerprint(path: str | os.PathLike) -> str:
    """A fast fingerprint of a slide file: BLAKE2b over its size and 16 sampled 1-MiB chunks.

    Hashing a whole multi-gigabyte slide would cost more than tiling it; sampled
    chunks (first, last and evenly spaced between) catch a replaced or truncated
    file, which is what re-run detection needs.
    """
    size = os.path.getsize(path)
    h = hashlib.blake2b(digest_size=16)
    h.update(str(size).encode())
    with open(path, "rb") as f:
        if size <= _FP_CHUNK * _FP_SAMPLES:
            h.update(f.read())
        else:
            for i in range(_FP_SAMPLES):
                f.seek((size - _FP_CHUNK) * i // (_FP_SAMPLES - 1))
                h.update(f.read(_FP_CHUNK))
    return f"blake2b:{h.hexdigest()}"


def rgba_to_rgb(rgba: Image.Image) -> np.ndarray:
    """RGBA from OpenSlide -> RGB uint8 array, transparent pixels (outside the scan) made white."""
    if rgba.getchannel("A").getextrema()[0] == 255:  # opaque (the usual case): PIL's C conversion is fastest
        return np.asarray(rgba.convert("RGB"))
    arr = np.asarray(rgba)
    rgb = arr[..., :3]
    a = arr[..., 3:4].astype(np.float32) / 255.0
    return (rgb * a + 255.0 * (1.0 - a)).round().astype(np.uint8)


@dataclass(frozen=True)
class SlideInfo:
    """Geometry and provenance of an opened slide (picklable, so workers can use it)."""

    path: Path
    slide_id: str
    vendor: str
    dimensions: tuple[int, int]
    level_dimensions: tuple[tuple[int, int], ...]
    level_downsamples: tuple[float, ...]
    mpp: float | None
    mpp_source: MppSource | None
    mpp_problem: str | None = None  # why ``mpp`` is None (missing or implausible), for the error


class Slide:
    """An opened slide. Use :func:`open_slide`; close it (or use ``with``) when done."""

    def __init__(self, osr: openslide.AbstractSlide, info: SlideInfo):
        self._osr = osr
        self.info = info

    # -- geometry -----------------------------------------------------------------
    @property
    def path(self) -> Path:
        return self.info.path

    @property
    def slide_id(self) -> str:
        return self.info.slide_id

    @property
    def dimensions(self) -> tuple[int, int]:
        return self.info.dimensions

    @property
    def level_count(self) -> int:
        return len(self.info.level_dimensions)

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        return self.info.level_dimensions

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        return self.info.level_downsamples

    @property
    def mpp(self) -> float:
        """Level-0 µm/px; raises :class:`SlideError` if the slide has none."""
        if self.info.mpp is None:
            raise SlideError(self.path, self.info.mpp_problem or "no MPP")
        return self.info.mpp

    @property
    def properties(self) -> dict[str, str]:
        return dict(self._osr.properties)

    def best_level_for_downsample(self, downsample: float) -> int:
        """The coarsest level whose downsample is at most ``downsample`` (+1 % tolerance)."""
        best = 0
        for level, ds in enumerate(self.level_downsamples):
            if ds <= downsample * 1.01:
                best = level
        return best

    # -- pixels -------------------------------------------------------------------
    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        """RGB uint8 array (h, w, 3) of ``size`` at ``level``; ``location`` in level-0 pixels."""
        try:
            region = self._osr.read_region((int(location[0]), int(location[1])), level, size)
        except openslide.OpenSlideError as err:
            raise SlideError(self.path, f"cannot read pixels: {err}") from err
        return rgba_to_rgb(region)

    def thumbnail(self, downsample: float) -> tuple[np.ndarray, tuple[float, float]]:
        """A thumbnail at about ``downsample`` level-0 px per thumbnail px.

        Returns the RGB array and the exact (x, y) downsample of the result. Built
        from the best level in blocks, so memory stays bounded by the thumbnail.
        """
        downsample = max(float(downsample), 1.0)
        w0, h0 = self.dimensions
        tw, th = max(1, round(w0 / downsample)), max(1, round(h0 / downsample))
        level = self.best_level_for_downsample(downsample)
        lds = self.level_downsamples[level]
        lw, lh = self.level_dimensions[level]
        out = np.full((th, tw, 3), 255, np.uint8)
        sx, sy = tw / lw, th / lh  # thumbnail px per level px
        block = _THUMB_BLOCK
        for by in range(0, lh, block):
            for bx in range(0, lw, block):
                bw, bh = min(block, lw - bx), min(block, lh - by)
                x0, y0 = round(bx * sx), round(by * sy)
                x1, y1 = round((bx + bw) * sx), round((by + bh) * sy)
                if x1 <= x0 or y1 <= y0:
                    continue
                pixels = self.read_region((round(bx * lds), round(by * lds)), level, (bw, bh))
                if (x1 - x0, y1 - y0) != (bw, bh):
                    resized = Image.fromarray(pixels).resize((x1 - x0, y1 - y0), Image.Resampling.BOX)
                    pixels = np.asarray(resized)
                out[y0:y1, x0:x1] = pixels
        return out, (w0 / tw, h0 / th)

    # -- lifetime -----------------------------------------------------------------
    def close(self) -> None:
        self._osr.close()

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _open_osr(path: Path) -> openslide.AbstractSlide:
    if not path.exists():
        raise SlideError(path, "file not found")
    if path.is_dir():
        raise SlideError(path, "is a directory, not a slide file")
    try:
        return openslide.open_slide(str(path))
    except openslide.OpenSlideUnsupportedFormatError as err:
        raise SlideError(path, f"not a slide format OpenSlide or PIL can open ({err})") from err
    except openslide.OpenSlideError as err:
        raise SlideError(path, f"OpenSlide cannot open it: {err}") from err
    except Exception as err:  # PIL fallback raises UnidentifiedImageError, OSError, DecompressionBombError...
        raise SlideError(path, f"cannot open as a slide: {type(err).__name__}: {err}") from err


def open_slide(
    path: str | os.PathLike,
    *,
    user_mpp: float | None = None,
    default_mpp: float | None = None,
    slide_id: str | None = None,
) -> Slide:
    """Open any slide OpenSlide opens (non-pyramidal images through its ``ImageSlide`` fallback).

    ``user_mpp`` (e.g. from a per-slide CSV) overrides the file's MPP;
    ``default_mpp`` is used only when the file has none. The resolved MPP is
    checked for plausibility (see :func:`.mpp.resolve_mpp`); a slide without a
    usable MPP still opens (thumbnails work), and :attr:`Slide.mpp` raises a
    :class:`SlideError` saying why when something needs it.
    """
    path = Path(path)
    osr = _open_osr(path)
    try:
        props = dict(osr.properties)
        problem = None
        try:
            mpp, source = resolve_mpp(path, props, user_mpp=user_mpp, default_mpp=default_mpp)
        except SlideError as err:
            mpp, source, problem = None, None, err.problem
        if mpp is None and problem is None:
            problem = "no microns-per-pixel (MPP) in the file; supply one with --mpp-csv or --default-mpp"
        info = SlideInfo(
            path=path,
            slide_id=slide_id or slide_id_for(path),
            vendor=props.get(openslide.PROPERTY_NAME_VENDOR) or type(osr).__name__,
            dimensions=tuple(osr.dimensions),
            level_dimensions=tuple(tuple(d) for d in osr.level_dimensions),
            level_downsamples=tuple(float(d) for d in osr.level_downsamples),
            mpp=mpp,
            mpp_source=source,
            mpp_problem=problem,
        )
    except BaseException:
        osr.close()
        raise
    return Slide(osr, info)
