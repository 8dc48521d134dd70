"""Slide artifacts and scanner effects for the synthetic cohort: pen marks, tissue folds, blur.

Drawn on a rendered level-0 slide (:func:`preprocessing._synth_render.render_slide`)
after the fact, with their own random stream (the slide's seed plus a tag), so a
configuration without artifacts draws exactly what it drew before and its slides
stay byte-identical.

* **Pen marks**: marker strokes (blue, green or black) drawn on the coverslip, so
  over tissue and glass alike; Beer-Lambert transmission of the ink multiplies the
  slide's light, with a soft anti-aliased edge and uneven ink density.
* **Tissue folds**: a band where the section lies double: optical density doubled
  (``I' = bg · (I / bg)²``), i.e. darker and more saturated on tissue, unchanged
  on glass, as a real fold of a thin section looks.
* **Out-of-focus patches**: a rectangle over tissue blurred with a Gaussian of
  several pixels, as a focus point that missed looks.

Each artifact is reported as level-0 boxes ``(kind, x0, y0, x1, y1)``, half-open.
A stroke or band is a polyline of short pieces (at most :data:`_PIECE` px), one box
per piece, so the boxes hug it instead of spanning a diagonal's bounding square.

:func:`scan_slide` is a site's scanner (blur, native resolution) and :func:`write_slide` the file it writes.
"""

from __future__ import annotations

import itertools
import math
import os
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from ._synth_render import SlidePlan, Stain, render_slide
from .tiffwrite import pyramid_shapes, write_pyramidal_tiff

if TYPE_CHECKING:
    from .synth import SynthConfig

Box = tuple[str, int, int, int, int]  # kind, x0, y0, x1, y1 (level 0, half-open)

# Ink transmission (R, G, B) at full density: blue and green marker and black marker.
INKS = {"blue": (0.15, 0.30, 0.75), "green": (0.20, 0.62, 0.38), "black": (0.10, 0.10, 0.12)}
_PIECE = 128  # longest piece of a stroke that gets its own box (level-0 px)
_ARTIFACT_TAG = 1  # appended to the slide's seed: the artifacts' own random stream
_TISSUE_GREY = 225  # tissue is darker than this on the synthetic glass (~235-245)
_DS = 8  # tissue is located on a grid this much coarser than level 0


def _tissue_points(image: Image.Image) -> np.ndarray:
    """(x, y) level-0 centres of the coarse cells that are tissue."""
    grey = np.asarray(image.reduce(_DS).convert("L"))
    ys, xs = np.nonzero(grey < _TISSUE_GREY)
    return np.stack([xs, ys], axis=1) * _DS + _DS // 2


def _polyline(rng: np.random.Generator, start: np.ndarray, length: float, size: tuple[int, int]) -> np.ndarray:
    """Vertices of a gently turning path of about ``length`` px from ``start``, pieces ≤ _PIECE px."""
    n = max(2, math.ceil(length / _PIECE))
    angle = rng.uniform(0, 2 * math.pi)
    pts = [start.astype(float)]
    for _ in range(n):
        angle += rng.uniform(-0.35, 0.35)
        pts.append(pts[-1] + length / n * np.array([math.cos(angle), math.sin(angle)]))
    return np.clip(np.array(pts), 0, np.array(size) - 1)


def _piece_boxes(kind: str, pts: np.ndarray, half: float, size: tuple[int, int]) -> list[Box]:
    boxes = []
    for a, b in itertools.pairwise(pts):
        x0, y0 = np.floor(np.minimum(a, b) - half).astype(int)
        x1, y1 = np.ceil(np.maximum(a, b) + half).astype(int) + 1
        x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, size[0]), min(y1, size[1])
        if x1 > x0 and y1 > y0:
            boxes.append((kind, int(x0), int(y0), int(x1), int(y1)))
    return boxes


def _stroke_alpha(pts: np.ndarray, width: int, size: tuple[int, int], soft: float) -> np.ndarray:
    """Coverage (float32 0..1, level 0) of a round-capped polyline of ``width`` px, edge softened."""
    canvas = Image.new("L", size, 0)
    draw = ImageDraw.Draw(canvas)
    flat = [tuple(p) for p in pts.tolist()]
    draw.line(flat, fill=255, width=width, joint="curve")
    r = width / 2
    for x, y in (flat[0], flat[-1]):
        draw.ellipse((x - r, y - r, x + r, y + r), fill=255)
    if soft > 0:
        canvas = canvas.filter(ImageFilter.GaussianBlur(soft))
    return np.asarray(canvas, np.float32) / 255.0


def _pen(rng: np.random.Generator, rgb: np.ndarray, start: np.ndarray, size: tuple[int, int]) -> list[Box]:
    kind = ("blue", "green", "black")[int(rng.integers(3))]
    # 80-160 µm at 0.5 µm/px: a fine marker tip (real ones are 0.3-1 mm, wider than these small
    # slides allow), 1-2 tiles of 112 µm, 10-20 px of the 8 µm/px tissue mask.
    width = int(rng.integers(160, 321))
    pts = _polyline(rng, start, rng.uniform(600, 1400), size)
    alpha = _stroke_alpha(pts, width, size, soft=3.0) * np.float32(rng.uniform(0.85, 1.0))
    absorb = 1.0 - np.array(INKS[kind], np.float32)
    ys, xs = np.nonzero(alpha > 0.004)
    grain = 1.0 - 0.08 * rng.random(len(ys), np.float32)  # uneven ink
    a = (alpha[ys, xs] * grain)[:, None]
    rgb[ys, xs] = np.clip(rgb[ys, xs] * (1.0 - a * absorb) + 0.5, 0, 255).astype(np.uint8)
    return _piece_boxes(f"pen_{kind}", pts, width / 2, size)


def _fold(
    rng: np.random.Generator, rgb: np.ndarray, start: np.ndarray, size: tuple[int, int], bg: np.ndarray
) -> list[Box]:
    width = int(rng.integers(64, 161))
    pts = _polyline(rng, start, rng.uniform(500, 1200), size)
    alpha = _stroke_alpha(pts, width, size, soft=4.0)
    ys, xs = np.nonzero(alpha > 0.004)
    t = np.clip(rgb[ys, xs].astype(np.float32) / bg, 1e-3, 1.0)
    power = 1.0 + alpha[ys, xs, None] * np.float32(rng.uniform(0.8, 1.0))  # OD × ~2 inside the band
    rgb[ys, xs] = np.clip(bg * t**power + 0.5, 0, 255).astype(np.uint8)
    return _piece_boxes("fold", pts, width / 2, size)


def _blur(rng: np.random.Generator, rgb: np.ndarray, centre: np.ndarray, size: tuple[int, int]) -> list[Box]:
    w, h = (int(v) for v in rng.integers(320, 641, 2))
    x0 = int(np.clip(centre[0] - w // 2, 0, max(size[0] - w, 0)))
    y0 = int(np.clip(centre[1] - h // 2, 0, max(size[1] - h, 0)))
    x1, y1 = min(x0 + w, size[0]), min(y0 + h, size[1])
    sigma = rng.uniform(3.0, 6.0)
    pad = math.ceil(3 * sigma)  # blur with context, then paste the box only
    px0, py0, px1, py1 = max(x0 - pad, 0), max(y0 - pad, 0), min(x1 + pad, size[0]), min(y1 + pad, size[1])
    region = Image.fromarray(np.ascontiguousarray(rgb[py0:py1, px0:px1])).filter(ImageFilter.GaussianBlur(sigma))
    rgb[y0:y1, x0:x1] = np.asarray(region)[y0 - py0 : y1 - py0, x0 - px0 : x1 - px0]
    return [("blur", x0, y0, x1, y1)]


def add_artifacts(
    image: Image.Image, plan: SlidePlan, cfg: SynthConfig, background: tuple
) -> tuple[Image.Image, list[Box]]:
    """Draw the configured numbers of folds, blurred patches and pen strokes (in that order: the pen
    is on the coverslip, above the section) and return the image and their level-0 boxes."""
    rng = np.random.default_rng(np.random.SeedSequence([*plan.seed, _ARTIFACT_TAG]))
    counts = [int(rng.integers(lo, hi + 1)) for lo, hi in (cfg.folds, cfg.blur_patches, cfg.pen_strokes)]
    if not any(counts):
        return image, []
    points = _tissue_points(image)
    if not len(points):
        return image, []
    rgb = np.array(image)
    size = image.size
    bg = np.array(background, np.float32)
    boxes: list[Box] = []
    for _ in range(counts[0]):
        boxes += _fold(rng, rgb, points[rng.integers(len(points))], size, bg)
    for _ in range(counts[1]):
        boxes += _blur(rng, rgb, points[rng.integers(len(points))], size)
    for _ in range(counts[2]):
        boxes += _pen(rng, rgb, points[rng.integers(len(points))], size)
    return Image.fromarray(rgb), boxes


def scanner_effects(image: Image.Image, blur_sigma: float, scale: float) -> Image.Image:
    """A site's scanner: a whole-slide optical blur (σ in level-0 px) and a coarser native
    resolution (``scale`` < 1 resamples the level-0 image by that factor)."""
    if blur_sigma > 0:
        image = image.filter(ImageFilter.GaussianBlur(blur_sigma))
    if scale != 1.0:
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        image = image.resize(size, Image.Resampling.LANCZOS)
    return image


def _scale_boxes(boxes: list, scale: float, width: int, height: int) -> list:
    """Boxes ``(..., x0, y0, x1, y1)`` resampled by ``scale`` and clipped to the resampled slide."""
    if scale == 1.0:
        return boxes
    out = []
    for *head, x0, y0, x1, y1 in boxes:
        out.append((*head, min(round(x0 * scale), width), min(round(y0 * scale), height),
                    min(round(x1 * scale), width), min(round(y1 * scale), height)))
    return out


def scan_slide(plan: SlidePlan, cfg: SynthConfig, stain: Stain, k: int) -> tuple[Image.Image, list, list, float]:
    """One slide as site ``k``'s scanner writes it: pixels, planted rects (x, y, w, h), artifact
    boxes and its level-0 µm/px. Artifacts are drawn before the scanner's blur and resampling."""
    image, rects = render_slide(plan, cfg, stain)
    boxes: list = []
    if cfg.has_artifacts:
        image, boxes = add_artifacts(image, plan, cfg, stain.background)
    mpp = cfg.site("site_mpp", k, cfg.mpp)
    scale = cfg.mpp / mpp
    image = scanner_effects(image, cfg.site("site_blur_sigma", k, 0.0), scale)
    if scale != 1.0:
        w, h = image.size
        corners = _scale_boxes([(x, y, x + rw, y + rh) for x, y, rw, rh in rects], scale, w, h)
        rects = [(x0, y0, x1 - x0, y1 - y0) for x0, y0, x1, y1 in corners]
        boxes = _scale_boxes(boxes, scale, w, h)
    return image, rects, boxes, mpp


def write_slide(path: str | os.PathLike, image: Image.Image, mpp: float, quality: int) -> None:
    """Write level 0 and box-downsampled lower levels (PIL ``reduce``) as a pyramidal TIFF."""
    width, height = image.size
    levels = {1.0: image}
    for ds, w, h in pyramid_shapes(width, height)[1:]:
        image = image.reduce(2)
        if image.size != (w, h):  # both round up when halving, so this cannot happen
            raise AssertionError(f"level {ds}: {image.size} != {(w, h)}")
        levels[ds] = image

    def render(ds: float, x: int, y: int, w: int, h: int) -> np.ndarray:
        return np.asarray(levels[ds].crop((x, y, x + w, y + h)))

    write_pyramidal_tiff(path, width, height, render, mpp=mpp, quality=quality)
