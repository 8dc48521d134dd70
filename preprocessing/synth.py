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
    out/<site>/artifacts.csv slide_id,kind,x0,y0,x1,y1   (level-0, half-open; header only
                             without artifacts; kind: pen_blue|pen_green|pen_black|fold|blur)

A tile counts as planted if most of it lies inside one planted rectangle.

This module holds the cohort's rules; the pixels of each slide are drawn by
:mod:`preprocessing._synth_render`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ._synth_artifacts import scan_slide, write_slide
from ._synth_render import SlidePlan, Stain
from .atomic import write_csv_atomic
from .errors import InputError

__all__ = ["PRESETS", "SiteSummary", "SynthConfig", "generate_cohort", "preset"]

LABELS_HEADER = ("slide_id", "label", "patient_id")
PLANTED_HEADER = ("slide_id", "x", "y", "width", "height")
ARTIFACTS_HEADER = ("slide_id", "kind", "x0", "y0", "x1", "y1")

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
    #: Darkness of the planted tumour texture relative to the default (1): lower values make the
    #: responder signal subtler (paler nuclei, less purple cytoplasm); sizes and crowding stay.
    tumour_contrast: float = 1.0
    #: Artifacts per slide, each drawn uniformly from the inclusive range; written to
    #: ``artifacts.csv``. Pen strokes (blue, green or black marker, on tissue and glass), tissue
    #: folds (double-layer bands) and out-of-focus patches. (0, 0) = none, the default.
    pen_strokes: tuple[int, int] = (0, 0)
    folds: tuple[int, int] = (0, 0)
    blur_patches: tuple[int, int] = (0, 0)
    #: Per-site overrides, entry k-1 for site k; sites past the end use the plain setting.
    #: Slide-count factors (site k gets ``max(2, round(slides_per_site × factor))`` slides
    #: instead of ``slides_per_site + k - 1``): one large and one small centre, as consortia have.
    site_size_factors: tuple[float, ...] = ()
    #: Whole-slide Gaussian blur (σ, level-0 px): a scanner's optics (0 = sharp).
    site_blur_sigma: tuple[float, ...] = ()
    #: JPEG quality per site: scanners compress differently.
    site_jpeg_quality: tuple[int, ...] = ()
    #: Native level-0 µm/px per site: the slide is drawn at ``mpp`` and resampled, so its tissue
    #: has the same physical size (e.g. 0.4532, a Hamamatsu 20× scan, beside Aperio's 0.5).
    site_mpp: tuple[float, ...] = ()
    #: A site-specific shortcut: at site ``shortcut_site`` (1-based; 0 = none) every responder is stained
    #: darker (H and E gains × ``1 + shortcut_strength``), as if one hospital's positives came from another
    #: staining batch. A model of that site alone can score by colour instead of tumour texture, and that
    #: does not transfer: the cue is absent elsewhere. Only those slides' colour changes (labels, planted
    #: regions, artifacts and random draws are the same), so the ground-truth files are identical.
    shortcut_site: int = 0
    shortcut_strength: float = 0.0

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
        if not 0.0 <= self.tumour_contrast <= 1.5:
            raise InputError(f"SynthConfig.tumour_contrast={self.tumour_contrast}: need 0..1.5")
        for name in ("pen_strokes", "folds", "blur_patches"):
            check_range(name, *getattr(self, name), 0, 10)
        if self.shortcut_site < 0 or not 0.0 <= self.shortcut_strength <= 1.0:
            raise InputError(f"SynthConfig.shortcut_site={self.shortcut_site}, shortcut_strength="
                             f"{self.shortcut_strength}: need a site number >= 0 (0: none) and a strength in 0..1")
        checks = {
            "site_size_factors": (0.05, 20.0),
            "site_blur_sigma": (0.0, 5.0),
            "site_jpeg_quality": (1, 100),
            "site_mpp": (self.mpp / 2, self.mpp * 2),
        }
        for name, (low, high) in checks.items():
            if not all(low <= v <= high for v in getattr(self, name)):
                raise InputError(f"SynthConfig.{name}={getattr(self, name)!r}: need values in {low}..{high}")

    @property
    def has_artifacts(self) -> bool:
        return any(hi > 0 for _, hi in (self.pen_strokes, self.folds, self.blur_patches))

    def stain_of(self, stain: Stain, k: int, label: int) -> Stain:
        """The staining of a label-``label`` slide of site ``k``: the site's, shifted by the shortcut."""
        if k != self.shortcut_site or not label or not self.shortcut_strength:
            return stain
        gain = 1.0 + self.shortcut_strength
        return replace(stain, h_gain=stain.h_gain * gain, e_gain=stain.e_gain * gain)

    def site(self, name: str, k: int, default: float) -> float:
        """Site ``k``'s value of the per-site override ``name``, else ``default``."""
        values = getattr(self, name)
        return values[k - 1] if k <= len(values) else default


#: Named configurations for ``synth-cohort --preset``. ``default``: the quick demo cohort
#: (clean slides, clear signal). ``realistic``: what multi-hospital pathology looks like to a
#: model: a weak signal in a small part of the tissue, one large and one small centre with
#: different prevalence, per-site scanner blur, JPEG quality and a different native µm/px at
#: site 3, pen marks, folds and out-of-focus patches (ground truth in ``artifacts.csv``), small slides
#: (1100-1400 px) and a colour shortcut at the small site 3 (its responders stained 50 % darker), which
#: its local model learns and which does not transfer. Tuned on the main job's seed 0 (see wsi_fl/demo.py).
PRESETS: dict[str, SynthConfig] = {
    "default": SynthConfig(),
    "realistic": SynthConfig(
        # Small slides (~10 tiles of 224 px each): the demo needs ~110 slides for >= 40 held-out ones and must
        # stay within minutes on 2 cores; a 256-px patch is then a small part of the tissue.
        size_range=(1100, 1400),
        min_region_side=256,
        tumour_fraction=(0.05, 0.12),
        regions_per_positive=(1, 2),
        tumour_contrast=0.9,
        prevalence_range=(0.1, 0.6),
        pen_strokes=(0, 2),
        folds=(0, 1),
        blur_patches=(0, 2),
        site_size_factors=(2.0, 1.0, 0.4),
        site_blur_sigma=(0.0, 0.8, 0.3),
        site_jpeg_quality=(90, 70, 95),
        site_mpp=(0.5, 0.5, 0.4532),
        shortcut_site=3,
        shortcut_strength=0.5,
    ),
}


def preset(name: str) -> SynthConfig:
    """The :data:`PRESETS` entry ``name`` (a one-line error naming the choices otherwise)."""
    if name not in PRESETS:
        raise InputError(f"unknown synthetic-cohort preset {name!r}; choose from {', '.join(PRESETS)}")
    return PRESETS[name]


@dataclass(frozen=True)
class SiteSummary:
    """What :func:`generate_cohort` wrote for one site."""

    site: str
    n_slides: int
    n_positive: int
    n_patients: int
    slides_dir: Path
    labels_csv: Path


# --------------------------------------------------------------------------------------------------
# Cohort plan: sites, patients, labels, stains
# --------------------------------------------------------------------------------------------------
def _site_prevalence(k: int, sites: int, lo: float, hi: float) -> float:
    return (lo + hi) / 2 if sites == 1 else lo + (hi - lo) * (k - 1) / (sites - 1)


def _plan_site(k: int, n: int, prevalence: float, cfg: SynthConfig, seed: int) -> list[SlidePlan]:
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
            SlidePlan(
                slide_id=f"{site}_s{i:03d}",
                patient_id=f"{site}_p{patient + 1:03d}",
                label=label,
                width=width,
                height=height,
                seed=(seed, k, i),
            )
        )
    return plans


def _site_slides(k: int, slides_per_site: int, cfg: SynthConfig) -> int:
    if k <= len(cfg.site_size_factors):
        return max(2, round(slides_per_site * cfg.site_size_factors[k - 1]))
    return slides_per_site + k - 1


def _site_stains(sites: int, shift: float, seed: int) -> list[Stain]:
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
            Stain(
                h=tuple(float(x) for x in h / np.linalg.norm(h)),
                e=tuple(float(x) for x in e / np.linalg.norm(e)),
                h_gain=float(1 + shift * 0.3 * (0.5 - u[k])),
                e_gain=float(1 + shift * 0.45 * (w[k] - 0.5)),
                background=tuple(float(x) for x in bg),
            )
        )
    return stains



def generate_cohort(
    out: Path,
    *,
    sites: int = 3,
    slides_per_site: int = 6,
    seed: int = 0,
    config: SynthConfig | str | None = None,
    progress: bool = True,
    task: str = "classification",
) -> list[SiteSummary]:
    """Write the synthetic cohort under ``out`` (see the module docstring for layout and rules).

    ``config`` is a :class:`SynthConfig` or the name of one of :data:`PRESETS`. Existing files
    of the same names are replaced. Returns one summary per site.
    """
    if sites < 1 or slides_per_site < 1:
        raise InputError(f"need sites >= 1 and slides_per_site >= 1, got {sites} and {slides_per_site}")
    if seed < 0:
        raise InputError(f"seed must be >= 0, got {seed}")
    if task not in ("classification", "survival"):
        raise InputError(f"task must be classification or survival, not {task!r}")
    cfg = preset(config) if isinstance(config, str) else config or SynthConfig()
    out = Path(out)
    stains = _site_stains(sites, cfg.site_stain_shift, seed)
    plans = {
        k: _plan_site(k, _site_slides(k, slides_per_site, cfg), _site_prevalence(k, sites, *cfg.prevalence_range),
                      cfg, seed)
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
            planted, artifacts = [], []
            quality = int(cfg.site("site_jpeg_quality", k, cfg.jpeg_quality))
            for plan in site_plans:
                image, rects, boxes, mpp = scan_slide(plan, cfg, cfg.stain_of(stains[k - 1], k, plan.label), k)
                write_slide(slides_dir / f"{plan.slide_id}.tiff", image, mpp, quality)
                planted += [(plan.slide_id, *rect) for rect in rects]
                artifacts += [(plan.slide_id, *box) for box in boxes]
                bar.update()
            write_csv_atomic(out / site / "artifacts.csv", ARTIFACTS_HEADER, artifacts)
            labels_csv = out / site / "labels.csv"
            if task == "survival":  # labels.csv also gets time,event (preprocessing._synth_survival)
                from ._synth_survival import SURVIVAL_LABELS_HEADER, survival_rows

                write_csv_atomic(labels_csv, SURVIVAL_LABELS_HEADER, survival_rows(site_plans, planted, seed, k))
            else:
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
