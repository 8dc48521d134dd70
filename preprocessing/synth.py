"""A deterministic synthetic multi-site cohort of small H&E-like slides.

The demo and the tests need slides that exercise the whole pipeline (tissue
detection, tiling at a physical resolution, feature extraction, federated
attention-MIL) without shipping or downloading real patient data. So each
slide here is a real pyramidal TIFF that OpenSlide opens, with:

* **Tissue on glass.** A near-white background (~235-245) and a few irregular
  tissue regions: thresholded smoothed noise, tapered away from the borders.
* **H&E-like texture at 0.5 µm/px.** Pink, fibrous stroma with sparse small
  purple nuclei (spindle and round), composed by Beer-Lambert mixing of a
  hematoxylin and an eosin concentration map, so colours darken and shift the
  way stained tissue does.
* **Site effects.** Every site (hospital) has its own stain vectors, stain
  strengths and background tint, as real federations do; features and mean
  colours therefore differ by site, which is what federated training must
  cope with.
* **A planted signal.** Responders (label 1) carry one or more rectangles of
  tumour-like texture (crowded, large, dark, pleomorphic nuclei on a purplish
  cytoplasm) covering a minority of their tissue; non-responders carry none.
  The rectangles are written to ``planted.csv`` as ground truth for attention.

Cohort rules (all deterministic for a seed):

* Sites are ``site_1`` … ``site_K``; site *k* gets ``slides_per_site + k - 1``
  slides, so slide counts differ across sites.
* The target prevalence of site *k* rises linearly across sites from
  ``prevalence_range[0]`` (site 1) to ``prevalence_range[1]`` (site K); a
  single site gets the midpoint. The number of positive slides is the target
  rounded, but at least one of each class whenever the site has ≥ 2 slides.
* Some patients have two slides (both share the patient's label), so a
  slide-level split would leak a patient; later stages must split by patient.
* Randomness comes from :class:`numpy.random.SeedSequence` keyed by
  ``(seed, site)`` and ``(seed, site, slide)``, so the same seed and arguments
  give the same CSVs byte for byte and the same pixels (in practice the same
  TIFF bytes too). Site stains depend on the number of sites, so ``site_1`` of
  a 3-site cohort is not ``site_1`` of a 1-site cohort.

Output layout::

    out/<site>/slides/<slide_id>.tiff
    out/<site>/labels.csv    slide_id,label,patient_id
    out/<site>/planted.csv   slide_id,x,y,width,height   (level-0 pixels)

A tile counts as planted if most of it lies inside one planted rectangle.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
from PIL import Image
from scipy.ndimage import binary_dilation, binary_erosion, gaussian_filter
from skimage.draw import ellipse
from skimage.transform import integral_image
from tqdm import tqdm

from .atomic import write_csv_atomic
from .errors import InputError
from .tiffwrite import pyramid_shapes, write_pyramidal_tiff

__all__ = ["SiteSummary", "SynthConfig", "generate_cohort"]

LABELS_HEADER = ("slide_id", "label", "patient_id")
PLANTED_HEADER = ("slide_id", "x", "y", "width", "height")

# Low-resolution fields (tissue shape, region placement) live on a grid this many
# level-0 pixels per cell: fine enough for ragged tissue edges, cheap to smooth.
_LR = 8
# Stroma fibres are drawn on a grid this much coarser than level 0 and upsampled.
_FIBRE_DS = 2
_ANGLE_BINS = 12
_MAX_TISSUE_ATTEMPTS = 20
# Planted rectangles keep at least this many low-res cells (× _LR px) apart, so they read as separate regions.
_REGION_GAP = 8

# Optical density per unit stain (R, G, B) at the two ends of each site's stain
# range; a site's vector is a blend of the two. Hematoxylin from bluish to
# purplish, eosin from magenta-pink to orange-red (near Ruifrok & Johnston's).
_H_ENDS = (np.array([0.72, 0.62, 0.30]), np.array([0.58, 0.76, 0.30]))
_E_ENDS = (np.array([0.15, 0.98, 0.10]), np.array([0.02, 0.90, 0.45]))


@dataclass(frozen=True)
class SynthConfig:
    """How the synthetic slides look. The defaults give small slides for a quick demo."""

    #: Level-0 µm/px written into the TIFF; the texture sizes below assume ~0.5.
    mpp: float = 0.5
    #: Level-0 width and height, each drawn uniformly from this range (px). The
    #: default gives roughly 60-200 tissue tiles of 224 px per slide.
    size_range: tuple[int, int] = (2800, 4000)
    #: Fraction of the slide area covered by tissue, drawn per slide.
    tissue_fraction: tuple[float, float] = (0.35, 0.55)
    #: On responders, planted (tumour-like) area as a fraction of tissue area, drawn per slide.
    tumour_fraction: tuple[float, float] = (0.12, 0.28)
    #: Number of planted rectangles on a responder, drawn per slide (inclusive);
    #: fewer when the tumour area is too small for that many of ``min_region_side``.
    regions_per_positive: tuple[int, int] = (1, 3)
    #: Shortest side of a planted rectangle (level-0 px). 448 = 2 × 224, so every
    #: rectangle holds at least one whole 224-px tile whatever the tiling grid.
    min_region_side: int = 448
    #: Target label prevalence of the first and of the last site (linear in between).
    prevalence_range: tuple[float, float] = (0.3, 0.6)
    #: About this fraction of a site's slides belong to patients with two slides
    #: (at least one such patient per site with ≥ 3 slides).
    two_slide_fraction: float = 0.3
    #: Scale of the per-site stain/colour differences: 0 = identical staining
    #: everywhere, 1 = realistic inter-hospital variation.
    site_stain_shift: float = 1.0
    #: JPEG quality of the TIFF tiles.
    jpeg_quality: int = 90

    def __post_init__(self) -> None:
        def check_range(name: str, lo: float, hi: float, low: float, high: float) -> None:
            value = getattr(self, name)
            if len(value) != 2 or not (low <= value[0] <= value[1] <= high):
                raise InputError(f"SynthConfig.{name}={value!r}: need {low} <= lo <= hi <= {high}")

        if not 0.05 <= self.mpp <= 20:
            raise InputError(f"SynthConfig.mpp={self.mpp}: need 0.05..20 µm/px")
        check_range("size_range", *self.size_range, 256, 200_000)
        check_range("tissue_fraction", *self.tissue_fraction, 0.05, 0.8)
        check_range("tumour_fraction", *self.tumour_fraction, 0.01, 0.6)
        check_range("regions_per_positive", *self.regions_per_positive, 1, 20)
        check_range("prevalence_range", *self.prevalence_range, 0.0, 1.0)
        if not 16 <= self.min_region_side <= self.size_range[0] // 3:
            raise InputError(
                f"SynthConfig.min_region_side={self.min_region_side}: need 16..{self.size_range[0] // 3}"
                " (a third of the smallest slide side)"
            )
        if not 0.0 <= self.two_slide_fraction <= 1.0:
            raise InputError(f"SynthConfig.two_slide_fraction={self.two_slide_fraction}: need 0..1")
        if not 0.0 <= self.site_stain_shift <= 2.0:
            raise InputError(f"SynthConfig.site_stain_shift={self.site_stain_shift}: need 0..2")
        if not 1 <= self.jpeg_quality <= 100:
            raise InputError(f"SynthConfig.jpeg_quality={self.jpeg_quality}: need 1..100")


@dataclass(frozen=True)
class SiteSummary:
    """What :func:`generate_cohort` wrote for one site."""

    site: str
    n_slides: int
    n_positive: int
    n_patients: int
    slides_dir: Path
    labels_csv: Path


@dataclass(frozen=True)
class _Stain:
    """One site's staining: OD vectors, stain strengths and the glass colour."""

    h: tuple[float, float, float]
    e: tuple[float, float, float]
    h_gain: float
    e_gain: float
    background: tuple[float, float, float]


@dataclass(frozen=True)
class _SlidePlan:
    slide_id: str
    patient_id: str
    label: int
    width: int
    height: int
    seed: tuple[int, ...]  # SeedSequence entropy for this slide's pixels


Rect = tuple[int, int, int, int]  # x, y, width, height in level-0 px


# --------------------------------------------------------------------------------------------------
# Cohort plan: sites, patients, labels, stains
# --------------------------------------------------------------------------------------------------
def _site_prevalence(k: int, sites: int, lo: float, hi: float) -> float:
    return (lo + hi) / 2 if sites == 1 else lo + (hi - lo) * (k - 1) / (sites - 1)


def _plan_site(k: int, n: int, prevalence: float, cfg: SynthConfig, seed: int) -> list[_SlidePlan]:
    """Patients, labels and sizes of site ``k``'s ``n`` slides.

    Labels belong to patients (both slides of a patient share one). Positive
    patients are chosen greedily in random order until the positive *slide*
    count reaches the target; since at least one patient has a single slide,
    the target (clipped to 1..n-1) is always met exactly and both classes occur.
    """
    rng = np.random.default_rng(np.random.SeedSequence([seed, k]))
    site = f"site_{k}"
    pairs = round(n * cfg.two_slide_fraction / 2)
    if n >= 3 and cfg.two_slide_fraction > 0:
        pairs = max(pairs, 1)
    pairs = min(pairs, (n - 1) // 2)  # keep at least one single-slide patient
    sizes = [2] * pairs + [1] * (n - 2 * pairs)
    rng.shuffle(sizes)
    target = round(prevalence * n)
    if n >= 2:
        target = min(max(target, 1), n - 1)
    positive, n_pos = [], 0
    for size in sizes:
        take = n_pos + size <= target
        positive.append(take)
        n_pos += size * take
    slides = [(p, int(positive[p])) for p, size in enumerate(sizes) for _ in range(size)]
    order = rng.permutation(n)
    lo, hi = cfg.size_range
    plans = []
    for i, j in enumerate(order, start=1):
        patient, label = slides[j]
        width, height = (int(v) for v in rng.integers(lo, hi + 1, size=2))
        plans.append(
            _SlidePlan(
                slide_id=f"{site}_s{i:03d}",
                patient_id=f"{site}_p{patient + 1:03d}",
                label=label,
                width=width,
                height=height,
                seed=(seed, k, i),
            )
        )
    return plans


def _site_stains(sites: int, shift: float, seed: int) -> list[_Stain]:
    """Per-site staining, stratified so that every pair of sites differs visibly.

    Each site's hue and strength positions are drawn from distinct strata of
    [0, 1) (a shuffled stratum plus jitter), rather than independently, so two
    sites never end up with near-identical staining by chance.
    """
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0]))

    def strata() -> np.ndarray:
        return (rng.permutation(sites) + rng.uniform(0.15, 0.85, sites)) / sites

    u, v, w = strata(), strata(), strata()
    stains = []
    for k in range(sites):
        te, th = 0.5 + shift * (u[k] - 0.5), 0.5 + shift * (v[k] - 0.5)
        e = (1 - te) * _E_ENDS[0] + te * _E_ENDS[1]
        h = (1 - th) * _H_ENDS[0] + th * _H_ENDS[1]
        bg = np.clip(240.0 + shift * rng.uniform(-3.5, 3.5, 3), 235.0, 245.0)
        stains.append(
            _Stain(
                h=tuple(float(x) for x in h / np.linalg.norm(h)),
                e=tuple(float(x) for x in e / np.linalg.norm(e)),
                h_gain=float(1 + shift * 0.3 * (0.5 - u[k])),
                e_gain=float(1 + shift * 0.45 * (w[k] - 0.5)),
                background=tuple(float(x) for x in bg),
            )
        )
    return stains


# --------------------------------------------------------------------------------------------------
# Slide geometry: tissue and planted regions
# --------------------------------------------------------------------------------------------------
def _unit(a: np.ndarray) -> np.ndarray:
    return (a - a.mean()) / (a.std() + 1e-6)


def _tissue_field(rng: np.random.Generator, shape: tuple[int, int], fraction: float) -> np.ndarray:
    """Soft tissue mask (0..1) on the low-res grid: a few large ragged blobs away from the edges."""
    h, w = shape
    side = min(h, w)
    coarse = _unit(gaussian_filter(rng.standard_normal(shape, np.float32), 0.07 * side))
    ragged = _unit(gaussian_filter(rng.standard_normal(shape, np.float32), 0.02 * side))
    field = coarse + 0.3 * ragged
    # Taper towards the borders so tissue is not cut by the slide edge.
    ramp = 0.12 * side
    dy = np.minimum(np.arange(h), np.arange(h)[::-1]) / ramp
    dx = np.minimum(np.arange(w), np.arange(w)[::-1]) / ramp
    field -= 6.0 * (1.0 - np.clip(np.minimum.outer(dy, dx), 0, 1)).astype(np.float32)
    threshold = np.quantile(field, 1.0 - fraction)
    return np.clip((field - threshold) / 0.12 + 0.5, 0.0, 1.0).astype(np.float32)


def _place_regions(
    rng: np.random.Generator, tissue_lr: np.ndarray, cfg: SynthConfig, width: int, height: int
) -> list[Rect]:
    """Rectangles lying wholly inside tissue (with a margin) and apart from each other.

    The drawn tumour area is shared over the drawn number of regions. A
    rectangle that fits nowhere is shrunk (not below ``min_region_side``), and
    the area it gave up goes to further regions, up to the configured maximum.
    """
    tissue = tissue_lr > 0.5
    free = binary_erosion(tissue, iterations=2)
    remaining = rng.uniform(*cfg.tumour_fraction) * float(tissue.sum()) * _LR * _LR
    min_area = cfg.min_region_side**2
    most = cfg.regions_per_positive[1]
    n_regions = int(rng.integers(cfg.regions_per_positive[0], most + 1))
    n_regions = max(1, min(n_regions, int(remaining // min_area)))
    rects: list[Rect] = []
    while len(rects) < most and (not rects or remaining >= 0.5 * min_area):
        share = remaining / max(n_regions - len(rects), 1)
        placed = _place_one(rng, free, share / _LR**2, math.ceil(cfg.min_region_side / _LR))
        if placed is None:
            break
        y, x, h, w = placed
        taken = np.zeros_like(free)
        taken[y : y + h, x : x + w] = True
        free &= ~binary_dilation(taken, iterations=_REGION_GAP)
        remaining -= w * h * _LR**2
        rects.append((x * _LR, y * _LR, w * _LR, h * _LR))
    # Clip to the slide (the low-res grid rounds up); the taper keeps tissue off the edges anyway.
    return [(x, y, min(w, width - x), min(h, height - y)) for x, y, w, h in rects]


def _place_one(
    rng: np.random.Generator, free: np.ndarray, area: float, min_side: int
) -> tuple[int, int, int, int] | None:
    """(row, col, height, width) on the low-res grid of a random rectangle of about ``area``
    cells inside ``free``, shrunk as needed down to ``min_side``; None if even that fits nowhere."""
    aspect = rng.uniform(0.67, 1.5)
    rw, rh = math.sqrt(area * aspect), math.sqrt(area / aspect)
    scale = max(min_side / rw, min_side / rh, 1.0)  # keep the aspect when growing to the minimum
    rw, rh = rw * scale, rh * scale
    while True:
        w, h = max(min_side, round(rw)), max(min_side, round(rh))
        corners = _fitting_corners(free, w, h)
        if len(corners):
            y, x = corners[rng.integers(len(corners))]
            return int(y), int(x), h, w
        if w == min_side and h == min_side:
            return None
        rw, rh = rw * 0.85, rh * 0.85


def _fitting_corners(mask: np.ndarray, w: int, h: int) -> np.ndarray:
    """(row, col) of every top-left corner where an h × w window lies wholly inside ``mask``."""
    if h > mask.shape[0] or w > mask.shape[1]:
        return np.empty((0, 2), int)
    ii = np.pad(integral_image(mask.astype(np.int32)), ((1, 0), (1, 0)))
    sums = ii[h:, w:] - ii[:-h, w:] - ii[h:, :-w] + ii[:-h, :-w]
    return np.argwhere(sums == w * h)


# --------------------------------------------------------------------------------------------------
# Pixels
# --------------------------------------------------------------------------------------------------
@cache
def _nucleus_template(ry: int, rx: int, angle_bin: int) -> np.ndarray:
    """A soft elliptical nucleus (peak 1) with a fixed chromatin grain, deterministic per shape."""
    half = max(ry, rx) + 3
    t = np.zeros((2 * half + 1, 2 * half + 1), np.float32)
    rr, cc = ellipse(half, half, ry, rx, shape=t.shape, rotation=angle_bin * np.pi / _ANGLE_BINS)
    t[rr, cc] = 1.0
    t = gaussian_filter(t, 0.8)
    grain = np.random.default_rng([ry, rx, angle_bin]).uniform(0.75, 1.0, t.shape).astype(np.float32)
    t = t * gaussian_filter(grain, 0.6)
    t /= t.max()
    t.setflags(write=False)
    return t


def _stamp_nuclei(
    canvas: np.ndarray,
    ys: np.ndarray,
    xs: np.ndarray,
    ry: np.ndarray,
    rx: np.ndarray,
    angle: np.ndarray,
    stain: np.ndarray,
) -> None:
    """Draw nuclei into the quantised hematoxylin map; overlaps merge (max), as crowded nuclei look."""
    height, width = canvas.shape
    levels = stain * _H_LEVELS_PER_OD
    for y, x, a, b, ang, q in zip(
        ys.tolist(), xs.tolist(), ry.tolist(), rx.tolist(), angle.tolist(), levels.tolist(), strict=True
    ):
        t = _nucleus_template(a, b, ang)
        half = t.shape[0] // 2
        y0, x0 = y - half, x - half
        cy0, cx0 = max(y0, 0), max(x0, 0)
        cy1, cx1 = min(y0 + t.shape[0], height), min(x0 + t.shape[1], width)
        if cy1 <= cy0 or cx1 <= cx0:
            continue
        region = canvas[cy0:cy1, cx0:cx1]
        stamp = (t[cy0 - y0 : cy1 - y0, cx0 - x0 : cx1 - x0] * q + 0.5).astype(np.uint8)
        np.maximum(region, stamp, out=region)


# Stain concentrations are drawn quantised to uint8 and turned into colour through a
# 256 × 256 lookup table: per-pixel float Beer-Lambert (or skimage.color.combine_stains,
# which works in float64) costs several times more than the rest of a slide together.
_H_MAX, _E_MAX = 2.0, 1.2  # concentrations mapped to level 255
_H_LEVELS_PER_OD = 255 / _H_MAX
_E_LEVELS_PER_OD = 255 / _E_MAX


def _colour_lut(stain: _Stain, h_gain: float, e_gain: float) -> np.ndarray:
    """RGBA (packed uint32, native order) for every (hematoxylin, eosin) level pair.

    Beer-Lambert: I = I0 · exp(-(H·h + E·e)). Nuclei displace eosin, so E is
    reduced where H is high (up to 70 %), which keeps nuclei purple, not mauve.
    """
    h = np.arange(256, dtype=np.float64)[:, None] / _H_LEVELS_PER_OD
    e = np.arange(256, dtype=np.float64)[None, :] / _E_LEVELS_PER_OD
    e = e * (1.0 - 0.7 * np.minimum(h, 1.0)) * e_gain
    h = h * h_gain
    od = h[..., None] * np.array(stain.h) + e[..., None] * np.array(stain.e)
    rgb = np.clip(np.array(stain.background) * np.exp(-od) + 0.5, 0, 255).astype(np.uint8)
    rgba = np.concatenate([rgb, np.full((256, 256, 1), 255, np.uint8)], axis=-1)
    return rgba.reshape(-1, 4).view(np.uint32).ravel()


def _resize(a: np.ndarray, width: int, height: int) -> np.ndarray:
    """Bilinear resize of a 2-D float32 or uint8 array (PIL: several times faster than ndimage.zoom)."""
    return np.asarray(
        Image.fromarray(np.ascontiguousarray(a)).resize((width, height), Image.Resampling.BILINEAR)
    )


def _render_slide(plan: _SlidePlan, cfg: SynthConfig, stain: _Stain) -> tuple[Image.Image, list[Rect]]:
    """Level-0 RGB image of one slide and its planted rectangles (empty for label 0)."""
    rng = np.random.default_rng(np.random.SeedSequence(list(plan.seed)))
    width, height = plan.width, plan.height
    lr_shape = (math.ceil(height / _LR), math.ceil(width / _LR))
    fraction = rng.uniform(*cfg.tissue_fraction)
    for _ in range(_MAX_TISSUE_ATTEMPTS):
        tissue_lr = _tissue_field(rng, lr_shape, fraction)
        rects = _place_regions(rng, tissue_lr, cfg, width, height) if plan.label else []
        if rects or not plan.label:
            break
    else:
        raise RuntimeError(f"{plan.slide_id}: no room for a planted region; raise size_range")

    # Eosin (stroma): wavy fibres whose orientation drifts across the slide, and patchy
    # staining; built on a grid _FIBRE_DS times coarser than level 0, then upsampled.
    fs_h, fs_w = math.ceil(height / _FIBRE_DS), math.ceil(width / _FIBRE_DS)
    along_x = _unit(gaussian_filter(rng.standard_normal((fs_h, fs_w), np.float32), (0.8, 4.0)))
    along_y = _unit(gaussian_filter(rng.standard_normal((fs_h, fs_w), np.float32), (4.0, 0.8)))
    mix = np.clip(_unit(gaussian_filter(rng.standard_normal(lr_shape, np.float32), 6)) + 0.5, 0, 1)
    patchy = _unit(gaussian_filter(rng.standard_normal(lr_shape, np.float32), 4))
    mix = _resize(mix, fs_w, fs_h)
    base = _resize(tissue_lr * (1.0 + 0.08 * patchy), fs_w, fs_h)
    eosin = base * (0.42 * (1.0 + 0.3 * (mix * along_x + (1.0 - mix) * along_y)))
    eosin_q = np.clip(eosin * _E_LEVELS_PER_OD + 0.5, 0, 255).astype(np.uint8)
    eosin_q = np.array(_resize(eosin_q, width, height))
    haem_q = np.zeros((height, width), np.uint8)

    # Normal tissue: sparse small nuclei, mostly spindle-shaped (fibroblasts), some round (lymphocytes).
    n = rng.poisson(width * height / 800)
    ys, xs = rng.integers(0, height, n), rng.integers(0, width, n)
    keep = tissue_lr[ys // _LR, xs // _LR] > 0.6
    for x, y, w, h in rects:
        keep &= ~((xs >= x) & (xs < x + w) & (ys >= y) & (ys < y + h))
    ys, xs = ys[keep], xs[keep]
    n = len(ys)
    spindle = rng.random(n) < 0.7
    ry = np.where(spindle, rng.integers(2, 4, n), rng.integers(3, 5, n))
    rx = np.where(spindle, rng.integers(5, 9, n), ry + rng.integers(0, 2, n))
    _stamp_nuclei(haem_q, ys, xs, ry, rx, rng.integers(0, _ANGLE_BINS, n), rng.uniform(0.65, 1.0, n))

    # Planted tumour: sheets of crowded, large, dark, pleomorphic nuclei on a purplish cytoplasm.
    spacing = 21.0
    for x, y, w, h in rects:
        gy = np.arange(y + spacing / 2, y + h, spacing * 0.866)
        gx = np.arange(x + spacing / 2, x + w, spacing)
        cy, cx = np.meshgrid(gy, gx, indexing="ij")
        cx = cx + (np.arange(len(gy))[:, None] % 2) * spacing / 2  # hexagonal packing
        cy, cx = cy.ravel(), cx.ravel()
        m = len(cy)
        cy = np.clip(np.rint(cy + rng.uniform(-4, 4, m)), y, y + h - 1).astype(int)
        cx = np.clip(np.rint(cx + rng.uniform(-4, 4, m)), x, x + w - 1).astype(int)
        keep = rng.random(m) > 0.08
        cy, cx, m = cy[keep], cx[keep], int(keep.sum())
        giant = (rng.random(m) < 0.1) * rng.integers(3, 6, m)
        ry = rng.integers(6, 10, m) + giant
        rx = rng.integers(7, 12, m) + giant
        eosin_q[y : y + h, x : x + w] = (eosin_q[y : y + h, x : x + w] * 0.65).astype(np.uint8)
        haem_q[y : y + h, x : x + w] = round(0.15 * _H_LEVELS_PER_OD)  # cytoplasm
        _stamp_nuclei(haem_q, cy, cx, ry, rx, rng.integers(0, _ANGLE_BINS, m), rng.uniform(1.1, 1.5, m))

    lut = _colour_lut(stain, stain.h_gain * rng.uniform(0.95, 1.05), stain.e_gain * rng.uniform(0.93, 1.07))
    index = haem_q.astype(np.uint16)
    index <<= 8
    index |= eosin_q
    rgba = lut[index].view(np.uint8).reshape(height, width, 4)
    return Image.fromarray(rgba, "RGBA").convert("RGB"), rects


def _write_slide(path: Path, image: Image.Image, cfg: SynthConfig) -> None:
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

    write_pyramidal_tiff(path, width, height, render, mpp=cfg.mpp, quality=cfg.jpeg_quality)


def generate_cohort(
    out: Path,
    *,
    sites: int = 3,
    slides_per_site: int = 6,
    seed: int = 0,
    config: SynthConfig | None = None,
    progress: bool = True,
) -> list[SiteSummary]:
    """Write the synthetic cohort under ``out`` (see the module docstring for layout and rules).

    Existing files of the same names are replaced. Returns one summary per site.
    """
    if sites < 1 or slides_per_site < 1:
        raise InputError(f"need sites >= 1 and slides_per_site >= 1, got {sites} and {slides_per_site}")
    if seed < 0:
        raise InputError(f"seed must be >= 0, got {seed}")
    cfg = config or SynthConfig()
    out = Path(out)
    stains = _site_stains(sites, cfg.site_stain_shift, seed)
    plans = {
        k: _plan_site(
            k, slides_per_site + k - 1, _site_prevalence(k, sites, *cfg.prevalence_range), cfg, seed
        )
        for k in range(1, sites + 1)
    }
    summaries = []
    with tqdm(
        total=sum(map(len, plans.values())), desc="synthetic slides", unit="slide", disable=not progress
    ) as bar:
        for k, site_plans in plans.items():
            site = f"site_{k}"
            slides_dir = out / site / "slides"
            slides_dir.mkdir(parents=True, exist_ok=True)
            planted = []
            for plan in site_plans:
                image, rects = _render_slide(plan, cfg, stains[k - 1])
                _write_slide(slides_dir / f"{plan.slide_id}.tiff", image, cfg)
                planted += [(plan.slide_id, *rect) for rect in rects]
                bar.update()
            labels_csv = out / site / "labels.csv"
            write_csv_atomic(labels_csv, LABELS_HEADER, [(p.slide_id, p.label, p.patient_id) for p in site_plans])
            write_csv_atomic(out / site / "planted.csv", PLANTED_HEADER, planted)
            summaries.append(
                SiteSummary(
                    site=site,
                    n_slides=len(site_plans),
                    n_positive=sum(p.label for p in site_plans),
                    n_patients=len({p.patient_id for p in site_plans}),
                    slides_dir=slides_dir,
                    labels_csv=labels_csv,
                )
            )
    return summaries
