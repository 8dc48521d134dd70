"""Microns per pixel: where a slide's physical resolution comes from, and whether to believe it.

Tiling at a physical resolution (not a pyramid level) is only as good as the
MPP it starts from, so the rules are explicit:

1. A per-slide value from the user (``--mpp-csv``) wins: it exists to correct
   files whose metadata is wrong or missing.
2. Otherwise the file's own ``openslide.mpp-x``/``-y``.
3. Otherwise the user's default for all slides (``--default-mpp``), if given.
4. Otherwise the slide has no MPP, and tiling it fails with a clear error.

Whatever the source, a value outside :data:`MPP_RANGE` is refused: no
brightfield scanner produces 0.01 µm/px, and 352 µm/px (a TIFF whose
resolution tag is really DPI for print) would make one "tile" span centimetres.
"""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path
from typing import Literal

import openslide

from .errors import InputError, SlideError

MppSource = Literal["file", "user-csv", "user-default"]

#: Plausible level-0 µm/px for histology (≈ 0.1 at 100× oil to ≈ 10 for a macro image).
MPP_RANGE = (0.05, 50.0)
#: x and y MPP that differ by more than this fraction are refused (non-square pixels).
MAX_ANISOTROPY = 0.05


#: What fixes an implausible value from each source. Only --mpp-csv overrides the file (rule 1 above).
_FIX = {
    "file metadata": "supply the right one for this slide with --mpp-csv (it overrides the file)",
    "user's --mpp-csv": "correct this slide's row in --mpp-csv",
    "user's --default-mpp": "correct --default-mpp",
}


def check_mpp(path: str | os.PathLike, mpp: float, source: str) -> float:
    """Return ``mpp`` if plausible, else raise :class:`SlideError` naming the value, its source and the fix."""
    lo, hi = MPP_RANGE
    if not math.isfinite(mpp) or not lo <= mpp <= hi:
        raise SlideError(path, f"implausible MPP {mpp:g} µm/px from the {source} (expected {lo:g}-{hi:g}); "
                               f"{_FIX.get(source, 'supply the right one with --mpp-csv')}")
    return float(mpp)


def file_mpp(path: str | os.PathLike, properties: dict[str, str]) -> float | None:
    """The level-0 MPP recorded in the file, or ``None`` if there is none."""
    raw_x = properties.get(openslide.PROPERTY_NAME_MPP_X)
    raw_y = properties.get(openslide.PROPERTY_NAME_MPP_Y)
    if raw_x is None and raw_y is None:
        return None
    try:
        values = [float(v) for v in (raw_x, raw_y) if v is not None]
    except ValueError as err:
        raise SlideError(path, f"unreadable MPP in file metadata ({raw_x!r}, {raw_y!r})") from err
    if any(v <= 0 or not math.isfinite(v) for v in values):
        return None  # some writers put 0 for "unknown"
    mx, my = values[0], values[-1]
    if abs(mx - my) / max(mx, my) > MAX_ANISOTROPY:
        raise SlideError(path, f"non-square pixels (MPP x={mx:g}, y={my:g}) are not supported")
    return (mx + my) / 2


def resolve_mpp(
    path: str | os.PathLike,
    properties: dict[str, str],
    *,
    user_mpp: float | None = None,
    default_mpp: float | None = None,
) -> tuple[float | None, MppSource | None]:
    """Apply the precedence rules of this module; returns ``(mpp, source)`` or ``(None, None)``."""
    if user_mpp is not None:
        return check_mpp(path, user_mpp, "user's --mpp-csv"), "user-csv"
    from_file = file_mpp(path, properties)
    if from_file is not None:
        return check_mpp(path, from_file, "file metadata"), "file"
    if default_mpp is not None:
        return check_mpp(path, default_mpp, "user's --default-mpp"), "user-default"
    return None, None


def read_mpp_csv(path: str | os.PathLike) -> dict[str, float]:
    """Read a per-slide MPP table: a CSV with columns ``slide_id,mpp`` (header required)."""
    path = Path(path)
    try:
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            if not reader.fieldnames or not {"slide_id", "mpp"} <= set(reader.fieldnames):
                raise InputError(f"needs columns slide_id,mpp (found {reader.fieldnames})")
            table: dict[str, float] = {}
            for line, row in enumerate(reader, start=2):
                try:
                    table[row["slide_id"].strip()] = float(row["mpp"])
                except (TypeError, ValueError) as err:
                    raise InputError(f"line {line}: bad mpp {row.get('mpp')!r}") from err
    except (OSError, ValueError) as err:
        raise InputError(f"{path}: {err}") from err
    return table
