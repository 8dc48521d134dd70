"""Where the model looked: attention heatmaps over a slide thumbnail, and tile GeoJSON for QuPath.

Two outputs serve two readers. The PNG heatmap is for a report or a quick look.
The GeoJSON is for a pathologist, who imports it into QuPath (*File > Import
objects from file*) and inspects the highest-attention tiles at full
resolution, colouring tiles by the ``attention`` measurement (*Measure >
Show measurement maps*).

GeoJSON follows QuPath's own export format (QuPath >= 0.4): a
``FeatureCollection`` whose features have a ``Polygon`` geometry in level-0
pixel coordinates (origin at the top-left of the full-resolution image, the
same frame as the ``coords`` of the feature files) and ``properties`` holding
``objectType``, ``name``, an optional ``classification`` ``{"name", "color"}``
and ``measurements`` as a name -> number dict. Feature ids are UUIDs derived
from the slide id and tile index, so re-exporting gives the same objects.

Attention from a softmax is heavy-tailed: a handful of tiles take most of the
mass, so min-max scaling paints nearly the whole slide in the bottom colour.
The heatmap therefore colours by *rank* (percentile within the slide) by
default; ``normalize="minmax"`` gives the linear view when magnitudes matter.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any, Literal

import numpy as np
from matplotlib import colormaps
from PIL import Image, ImageDraw
from scipy.stats import rankdata

from preprocessing.atomic import atomic_path
from preprocessing.qc import save_qc
from preprocessing.slide import open_slide

__all__ = [
    "TOP_CLASS_COLOR",
    "TOP_CLASS_NAME",
    "attention_geojson",
    "attention_heatmap",
    "normalize_attention",
    "top_k_tiles",
    "write_geojson",
]

Normalization = Literal["rank", "minmax"]

TOP_CLASS_NAME = "High attention"
TOP_CLASS_COLOR = (255, 0, 0)
_UUID_NAMESPACE = uuid.UUID("5b0c6f0e-2a43-4c55-9d1c-7f3e9b1f6a10")  # fixed: ids stable across exports


def _check(coords: Any, attention: Any, *, allow_nan: bool = False) -> tuple[np.ndarray, np.ndarray]:
    c = np.asarray(coords, dtype=np.float64)
    a = np.asarray(attention, dtype=np.float64)
    if c.ndim != 2 or c.shape[1] != 2:
        raise ValueError(f"coords must have shape (n, 2), got {c.shape}")
    if a.shape != (len(c),):
        raise ValueError(f"attention must have shape ({len(c)},), got {a.shape}")
    if not np.all(np.isfinite(c)):
        raise ValueError("coords must be finite")
    if not allow_nan and not np.all(np.isfinite(a)):
        raise ValueError("attention must be finite")
    return c, a


def normalize_attention(attention: np.ndarray, method: Normalization = "rank") -> np.ndarray:
    """Attention mapped to [0, 1] within the slide; NaN entries stay NaN.

    ``"rank"``: percentile rank, ties averaged (lowest 0, highest 1), so colours
    spread evenly whatever the distribution. ``"minmax"``: linear between the
    slide's min and max. A single tile, or all-equal attention, maps to 1.
    """
    a = np.asarray(attention, dtype=np.float64)
    out = np.full(a.shape, np.nan)
    ok = np.isfinite(a)
    vals = a[ok]
    if vals.size == 0:
        return out
    if method == "rank":
        scaled = (rankdata(vals, method="average") - 1) / (vals.size - 1) if vals.size > 1 else np.ones(1)
    elif method == "minmax":
        span = vals.max() - vals.min()
        scaled = (vals - vals.min()) / span if span > 0 else np.ones_like(vals)
    else:
        raise ValueError(f"normalize must be 'rank' or 'minmax', got {method!r}")
    out[ok] = scaled
    return out


def _ranks(a: np.ndarray) -> np.ndarray:
    """Rank 1 = highest attention; ties broken by tile order, so ranks are a permutation of 1..n."""
    order = np.argsort(-a, kind="stable")
    ranks = np.empty(len(a), dtype=np.int64)
    ranks[order] = np.arange(1, len(a) + 1)
    return ranks


def top_k_tiles(coords: np.ndarray, attention: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` highest-attention tiles, highest first (ties: earlier tile first)."""
    _, a = _check(coords, attention)
    k = max(0, min(int(k), len(a)))
    return np.argsort(-a, kind="stable")[:k]


def _num(v: float) -> int | float:
    """Whole numbers as JSON ints (tile coordinates usually are), others as floats."""
    return int(v) if float(v).is_integer() else float(v)


def attention_geojson(
    coords: np.ndarray,
    attention: np.ndarray,
    tile_size_level0: float,
    *,
    slide_id: str,
    top_k: int | None = None,
) -> dict:
    """One QuPath ``tile`` object per tile, with its attention, rank and scaled attention as measurements.

    ``coords`` are level-0 top-left corners; each tile becomes a closed square
    ring of side ``tile_size_level0``. Measurements: ``attention`` (raw),
    ``attention_rank`` (1 = highest), ``attention_scaled`` (min-max over the
    slide) and ``attention_percentile`` (rank-normalised, 1 = highest). The
    ``top_k`` highest get the classification :data:`TOP_CLASS_NAME`, so they can
    be selected in QuPath with one click.
    """
    c, a = _check(coords, attention)
    if not tile_size_level0 > 0:
        raise ValueError(f"tile_size_level0 must be positive, got {tile_size_level0}")
    ranks = _ranks(a)
    scaled = normalize_attention(a, "minmax")
    percentile = normalize_attention(a, "rank")
    n_top = 0 if top_k is None else max(0, int(top_k))
    s = float(tile_size_level0)
    features = []
    for i, ((x, y), att, rank) in enumerate(zip(c, a, ranks, strict=True)):
        x0, y0, x1, y1 = _num(x), _num(y), _num(x + s), _num(y + s)
        properties: dict[str, Any] = {
            "objectType": "tile",
            "name": f"rank {int(rank)}",
            "measurements": {
                "attention": float(att),
                "attention_rank": int(rank),
                "attention_scaled": float(scaled[i]),
                "attention_percentile": float(percentile[i]),
            },
            "metadata": {"slide_id": slide_id, "tile_index": str(i)},
        }
        if rank <= n_top:
            properties["classification"] = {"name": TOP_CLASS_NAME, "color": list(TOP_CLASS_COLOR)}
        features.append({
            "type": "Feature",
            "id": str(uuid.uuid5(_UUID_NAMESPACE, f"{slide_id}/{i}")),
            "geometry": {"type": "Polygon", "coordinates": [[[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]]},
            "properties": properties,
        })
    return {"type": "FeatureCollection", "features": features}


def write_geojson(collection: dict, path: str | os.PathLike) -> Path:
    """Write ``collection`` as JSON atomically (temporary name, then rename); NaN is refused, not written."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        json.dump(collection, f, allow_nan=False, separators=(",", ":"))
    return Path(path)


def _colorbar(height: int, cmap: str, low: str, high: str) -> Image.Image:
    """A vertical colour scale (high at the top) with its end labels, to stand right of the heatmap."""
    width = max(48, height // 10)
    panel = Image.new("RGB", (width, height), "white")
    bar_w, margin = max(8, width // 4), max(12, height // 20)
    bar_h = max(1, height - 2 * margin)
    values = np.linspace(1.0, 0.0, bar_h)
    rgb = (colormaps[cmap](values)[:, :3] * 255).round().astype(np.uint8)
    panel.paste(Image.fromarray(np.repeat(rgb[:, None, :], bar_w, axis=1)), (4, margin))
    draw = ImageDraw.Draw(panel)
    draw.text((4, 0), high, fill="black")
    draw.text((4, height - margin + 1), low, fill="black")
    return panel


def attention_heatmap(
    slide_path: str | os.PathLike,
    coords: np.ndarray,
    attention: np.ndarray,
    tile_size_level0: float,
    path: str | os.PathLike,
    *,
    max_side: int = 1024,
    cmap: str = "jet",
    alpha: float = 0.5,
    user_mpp: float | None = None,
    normalize: Normalization = "rank",
    colorbar: bool = True,
) -> Path:
    """PNG of the slide thumbnail with each tile's square tinted by its attention; returns ``path``.

    The thumbnail's longer side is at most ``max_side`` and is built from the
    pyramid (see :meth:`preprocessing.slide.Slide.thumbnail`), never from full
    resolution. Attention is scaled per slide by ``normalize`` (rank by default,
    see the module docstring), mapped through ``cmap`` and alpha-blended;
    overlapping tiles average. Pixels under no tile, and tiles whose attention
    is NaN, keep the plain thumbnail. ``user_mpp`` is passed to
    :func:`preprocessing.slide.open_slide` for slides whose MPP needs overriding.
    """
    c, a = _check(coords, attention, allow_nan=True)
    if not tile_size_level0 > 0:
        raise ValueError(f"tile_size_level0 must be positive, got {tile_size_level0}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    values = normalize_attention(a, normalize)
    with open_slide(slide_path, user_mpp=user_mpp) as slide:
        w0, h0 = slide.dimensions
        thumb, (dsx, dsy) = slide.thumbnail(max(w0, h0) / max(1, int(max_side)))
    th, tw = thumb.shape[:2]

    total = np.zeros((th, tw), np.float64)
    count = np.zeros((th, tw), np.int32)
    s = float(tile_size_level0)
    for (x, y), v in zip(c, values, strict=True):
        if np.isnan(v):
            continue
        x0, y0 = round(x / dsx), round(y / dsy)
        x1, y1 = max(x0 + 1, round((x + s) / dsx)), max(y0 + 1, round((y + s) / dsy))
        x0, y0, x1, y1 = max(0, x0), max(0, y0), min(tw, x1), min(th, y1)
        if x1 > x0 and y1 > y0:
            total[y0:y1, x0:x1] += v
            count[y0:y1, x0:x1] += 1

    out = thumb.astype(np.float64)
    covered = count > 0
    mean = total[covered] / count[covered]
    colours = colormaps[cmap](mean)[:, :3] * 255.0
    out[covered] = (1.0 - alpha) * out[covered] + alpha * colours
    image = Image.fromarray(out.round().clip(0, 255).astype(np.uint8))

    if colorbar:
        finite = a[np.isfinite(a)]
        if normalize == "rank" or finite.size == 0:
            low, high = "low", "high"
        else:
            low, high = f"{finite.min():.3g}", f"{finite.max():.3g}"
        bar = _colorbar(th, cmap, low, high)
        canvas = Image.new("RGB", (tw + bar.width, th), "white")
        canvas.paste(image, (0, 0))
        canvas.paste(bar, (tw, 0))
        image = canvas
    return save_qc(image, path)
