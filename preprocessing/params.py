"""What a tile is and how tissue is told from background: the parameters of a preprocessing run.

Standard library only, apart from the computations that use them
(:mod:`preprocessing.tiling`, :mod:`preprocessing.tissue`, which import numpy,
scipy and scikit-image), so ``wsi-fl preprocess --help`` lists these fields as
options, defaults and all, without importing any of those. Each field's
``metadata["help"]`` becomes the option's help text. The classes are
re-exported by the modules that use them, where callers have always found them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .errors import InputError

__all__ = ["STAIN_METHODS", "QCParams", "StainParams", "TilingParams", "TissueParams"]


@dataclass(frozen=True)
class TilingParams:
    """What a tile is."""

    #: µm/px of the tiles handed to the feature extractor (0.5 µm/px ≈ 20× objective).
    target_mpp: float = field(default=0.5, metadata={"help": "µm/px of the tiles"})
    #: Tile side in px at ``target_mpp`` (224: the input size of most ImageNet/pathology encoders).
    tile_size: int = field(default=224, metadata={"help": "tile side in px at the target MPP"})
    #: Step between tiles in px at ``target_mpp``; ``None`` = ``tile_size`` (no overlap).
    stride: int | None = field(
        default=None,
        metadata={"help": "step between tiles in px at the target MPP (default: tile size, no overlap)"},
    )
    #: Minimum fraction of a tile's area that must be tissue for the tile to be kept.
    min_tissue: float = field(
        default=0.5, metadata={"help": "minimum fraction of a tile's area that is tissue"}
    )

    def __post_init__(self) -> None:
        if not self.target_mpp > 0:
            raise InputError(f"target_mpp must be > 0, got {self.target_mpp}")
        if self.tile_size < 1:
            raise InputError(f"tile_size must be >= 1, got {self.tile_size}")
        if self.stride is not None and self.stride < 1:
            raise InputError(f"stride must be >= 1, got {self.stride}")
        if not 0 <= self.min_tissue <= 1:
            raise InputError(f"min_tissue must be in [0, 1], got {self.min_tissue}")

    @property
    def step(self) -> int:
        """The stride in target px, ``tile_size`` when not given."""
        return self.tile_size if self.stride is None else self.stride


@dataclass(frozen=True)
class TissueParams:
    """How tissue is told from background. Sizes are physical, so they do not depend on the scan's MPP."""

    #: µm/px of the thumbnail the mask is computed on. 8 µm/px keeps a 224-px tile at 0.5 µm/px
    #: (112 µm) 14 mask px wide, resolves biopsy fragments of a few tens of µm, and keeps a
    #: 25 mm slide at ~3,100 px a side (fast, ~10 MB).
    mask_mpp: float = field(
        default=8.0, metadata={"help": "µm/px of the thumbnail the tissue mask is computed on"}
    )
    #: Upper bound on the mask's long side in px; for huge slides the mask gets coarser instead
    #: of bigger, which bounds time and memory (4096² bool = 16 MB).
    max_mask_side: int = field(
        default=4096, metadata={"help": "largest mask side in px (huge slides get a coarser mask)"}
    )
    #: Fixed saturation threshold in [0, 1] that replaces Otsu (e.g. for a stain Otsu gets wrong).
    saturation_threshold: float | None = field(
        default=None, metadata={"help": "fixed HSV-saturation threshold in [0, 1] instead of Otsu"}
    )
    #: Lower clamp of the Otsu threshold: glass and sensor noise stay below it, so a blank or
    #: uniform slide gives an empty mask instead of "half of the noise is tissue".
    min_saturation: float = field(
        default=0.05,
        metadata={"help": "lower clamp of the Otsu saturation threshold (keeps blank slides empty)"},
    )
    #: Upper clamp of the Otsu threshold: on slides mostly covered by tissue, Otsu splits pale
    #: from dark tissue; pale H&E stroma has a saturation of ~0.15-0.2.
    max_saturation: float = field(
        default=0.15, metadata={"help": "upper clamp of the Otsu saturation threshold (keeps pale tissue)"}
    )
    #: Pixels whose R, G and B are all >= this (0-255) are background (bright, faintly tinted glass).
    white_level: int = field(
        default=220, metadata={"help": "pixels with R, G and B all >= this (0-255) are background"}
    )
    #: Pixels whose R, G and B are all <= this (0-255) are never tissue (black pen, out-of-focus
    #: debris, dark slide edges); they are removed again after hole filling.
    black_level: int = field(
        default=50,
        metadata={"help": "pixels with R, G and B all <= this (0-255) are never tissue (pen, debris)"},
    )
    #: Median-blur window side in µm (odd number of mask px, at least 1) against speckle noise.
    median_um: float = field(default=24.0, metadata={"help": "median-blur window in µm"})
    #: Radius in µm of the morphological closing that joins fragmented tissue (0: none).
    closing_um: float = field(default=16.0, metadata={"help": "morphological closing radius in µm (0: none)"})
    #: Radius in µm of a morphological opening that drops thin lines and specks. Off (0) by
    #: default: the median blur and ``min_region_um2`` already remove specks and 1-px lines, and an
    #: opening would also thin out the fine tissue strands of small biopsies.
    opening_um: float = field(default=0.0, metadata={"help": "morphological opening radius in µm (0: none)"})
    #: Connected tissue regions smaller than this (µm²) are dropped as dust. 2,500 µm² is a
    #: 50 × 50 µm speck, well below one 112 × 112 µm tile: tiny biopsy fragments survive
    #: (CLAM's default minimum contour area is larger than a whole 1.1 × 1.5 mm biopsy crop).
    min_region_um2: float = field(
        default=2_500.0, metadata={"help": "tissue regions smaller than this (µm²) are dropped as dust"}
    )
    #: Holes inside tissue of up to this area (µm²) are filled (cracks, fat, tears); larger ones
    #: (lumens, vessels) stay background. 4,000 µm² is about a third of a 224-px tile at 0.5 µm/px.
    max_hole_um2: float = field(
        default=4_000.0, metadata={"help": "holes in tissue up to this area (µm²) are filled"}
    )

    #: Remove pen ink (blue, green, other non-H&E colours) from the mask. Marker ink is strongly
    #: saturated, so the saturation test alone keeps it as tissue; see ``pen_*`` below.
    remove_pen: bool = field(default=True, metadata={"help": "remove pen ink (blue, green, ...) from the mask"})
    #: Hues (degrees, HSV) from ``pen_hue_min`` to ``pen_hue_max`` are ink colours when saturated:
    #: yellow, green, cyan and sky blue. H&E lies outside them, from bluish-purple haematoxylin
    #: (~230-300°) through magenta to pink-red eosin (~300-30°, wrapping at 360°). The bluest
    #: haematoxylin seen (shared kidney slide: 200-260° but saturation ≤ 0.2; synthetic cohort:
    #: down to ~235° at saturation ~0.45, less with JPEG noise) stays out of this class.
    pen_hue_min: float = field(default=30.0, metadata={"help": "lowest HSV hue (degrees) of pen ink"})
    pen_hue_max: float = field(default=215.0, metadata={"help": "highest HSV hue (degrees) of pen ink"})
    #: Minimum HSV saturation (0-1) of ink inside the ink hues. Marker ink is ~0.6-0.8 even over
    #: tissue; pale bluish tissue (haematoxylin-only stains, mucin) stays below ~0.2.
    pen_saturation: float = field(
        default=0.3, metadata={"help": "minimum saturation (0-1) of pen ink within the ink hues"}
    )
    #: From ``pen_hue_max`` to 270° (royal blue to blue-violet: blue marker, also over pink tissue)
    #: dense haematoxylin lies too, so only pixels saturated beyond any stain at mask resolution
    #: (nuclei reach ~0.55) are ink; blue marker is ~0.75-0.8.
    pen_blue_saturation: float = field(
        default=0.65, metadata={"help": "minimum saturation (0-1) of blue/violet ink (hues up to 270°)"}
    )
    #: Ink is dilated by this radius (µm) before removal: the anti-aliased, blurred edge of a stroke
    #: is too pale to be ink yet saturated enough to pass as tissue.
    pen_margin_um: float = field(default=16.0, metadata={"help": "pen ink is dilated by this radius in µm"})

    def __post_init__(self) -> None:
        if not self.mask_mpp > 0:
            raise InputError(f"mask_mpp must be > 0, got {self.mask_mpp}")
        if self.max_mask_side < 1:
            raise InputError(f"max_mask_side must be >= 1, got {self.max_mask_side}")
        if self.saturation_threshold is not None and not 0 <= self.saturation_threshold <= 1:
            raise InputError(f"saturation_threshold must be in [0, 1], got {self.saturation_threshold}")
        if not 0 <= self.min_saturation <= self.max_saturation <= 1:
            raise InputError("need 0 <= min_saturation <= max_saturation <= 1")
        if not 0 <= self.pen_hue_min <= self.pen_hue_max <= 270:
            raise InputError("need 0 <= pen_hue_min <= pen_hue_max <= 270 (degrees)")
        for name in ("pen_saturation", "pen_blue_saturation"):
            if not 0 <= getattr(self, name) <= 1:
                raise InputError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        for name in ("median_um", "closing_um", "opening_um", "min_region_um2", "max_hole_um2", "pen_margin_um"):
            if getattr(self, name) < 0:
                raise InputError(f"{name} must be >= 0, got {getattr(self, name)}")


@dataclass(frozen=True)
class QCParams:
    """Per-tile quality control (:mod:`preprocessing.artifacts`): what is measured and what excludes a tile.

    The measures are always computed and stored in the feature file (``qc/``), so thresholds can
    be revisited without re-reading slides. The default thresholds are the ones the measurements
    support (synthetic cohort with ground truth, and the real CMU-1 and TCGA crops; numbers at each
    field): they remove most blurred, folded and inked tiles while dropping no clean synthetic
    tile and ~1-2 % of the real slides' tiles. ``enabled=False`` (``--no-tile-qc``) excludes nothing.
    The thresholds are recorded in every feature file (``qc_params``).
    """

    #: Exclude tiles at all (the measures are computed either way).
    enabled: bool = field(default=True, metadata={"help": "exclude tiles failing the QC thresholds"})
    #: Tiles are average-pooled by this factor before the colour tests (pen, fold): 8 turns a
    #: 0.5 µm/px tile into ~4 µm/px, near the tissue mask's resolution the ink rule is tuned for,
    #: where single dark nuclei no longer look like ink.
    pool: int = field(default=8, metadata={"help": "pooling factor of tiles before the pen/fold colour tests"})
    #: Pooled pixels with every channel at most this (0-255) and a saturation of at most
    #: ``pen_dark_saturation`` are dark marker ink (black/grey pens are rarely darker than the mask's
    #: ``black_level``: the synthetic ones are ~50-60). Real tissue has almost none (CMU-1 and TCGA
    #: crops: ≤ 0.3 % of a tile's pooled pixels at 100 / 0.25); nuclei are dark but saturated.
    pen_dark_level: int = field(default=100, metadata={"help": "pen: dark grey pixels up to this level are ink"})
    pen_dark_saturation: float = field(default=0.25, metadata={"help": "pen: ... when no more saturated than this"})
    #: A fold pixel is saturated beyond this multiple of the slide's median tissue saturation:
    #: a double layer doubles the optical density, which raises saturation ~1.3-1.7× (measured on
    #: the synthetic folds), while tumour and dense nuclei stay ~1.0× (they get darker and bluer,
    #: not more saturated).
    fold_saturation_ratio: float = field(
        default=1.25, metadata={"help": "fold: saturation above this multiple of the slide's tissue median"}
    )
    #: Pooling factor for the fold test: 16 turns a 0.5 µm/px tile into ~8 µm/px, the scale of the
    #: thumbnail the slide's reference is measured on; finer, single nuclei look "saturated".
    fold_pool: int = field(default=16, metadata={"help": "pooling factor of tiles before the fold test"})
    #: ... within this many degrees of the tissue's mean hue: a fold doubles the same stain mix
    #: (pink stays pink), while dense nuclei and tumour shift towards haematoxylin blue.
    fold_max_hue_shift: float = field(
        default=20.0, metadata={"help": "fold: hue within this many degrees of the tissue's mean hue"}
    )
    #: ... and not brighter than this multiple of the slide's median tissue grey level (a fold is
    #: darker; pale, saturated-looking glass edges are not folds).
    fold_brightness_ratio: float = field(
        default=1.0, metadata={"help": "fold: grey level at most this multiple of the slide's tissue median"}
    )
    #: Exclude tiles whose variance of the Laplacian (over tissue) is below this fraction of the
    #: slide's median (measured on a sample of its tiles before extraction); ``None`` keeps all.
    #: Relative, because the absolute value depends on scanner, resolution and tissue (synthetic
    #: tissue ~30, the real CMU-1 crop ~1,800). Real tissue varies widely: the lowest of the CMU-1
    #: and TCGA crops' tiles are at 0.24 and 0.35× their median, the 5th percentiles ~0.37×. On 6
    #: synthetic slides, clean tiles are ≥ 0.8× (1st percentile) and tiles mostly inside blurred
    #: patches ~0.28× (median): 0.3 drops 55 % of those, no clean synthetic tile and 1 of 92 real
    #: ones. A whole slide out of focus is a slide-level problem: its median is recorded
    #: (``qc_sharpness``) for that.
    min_sharpness_ratio: float | None = field(
        default=0.3, metadata={"help": "exclude tiles less sharp than this fraction of the slide's median"}
    )
    #: Exclude tiles whose variance of the Laplacian (grey 0-255, at the tile's resolution) is
    #: below this absolute value; ``None`` keeps all. Per scanner: set it from a site's own slides.
    min_sharpness: float | None = field(
        default=None, metadata={"help": "exclude tiles whose Laplacian variance is below this (default: none)"}
    )
    #: Exclude tiles with more than this fraction of pen ink; ``None`` keeps all. Clean synthetic
    #: tiles 0, the real CMU-1 crop ≤ 0.046; tiles mostly under synthetic ink 0.05-0.33 (median
    #: 0.17; most ink is already cut out of the tissue mask, so these are stroke edges).
    max_pen_fraction: float | None = field(
        default=0.1, metadata={"help": "exclude tiles with more than this fraction of pen ink"}
    )
    #: Exclude tiles with more than this fraction of fold; ``None`` keeps all. Clean synthetic tiles
    #: ≤ 0.13 (99th percentile), tiles mostly inside synthetic folds 0.32-0.66; 0.4 drops 71 % of
    #: those, no clean synthetic tile and 1 of 45 tiles of the real CMU-1 crop (0.3: every fold
    #: tile, but 4 of 45 real ones).
    max_fold_fraction: float | None = field(
        default=0.4, metadata={"help": "exclude tiles with more than this fraction of tissue fold"}
    )

    def __post_init__(self) -> None:
        if self.pool < 1 or self.fold_pool < 1:
            raise InputError(f"pool and fold_pool must be >= 1, got {self.pool} and {self.fold_pool}")
        if not 0 <= self.pen_dark_level <= 255 or not 0 <= self.pen_dark_saturation <= 1:
            raise InputError("need 0 <= pen_dark_level <= 255 and 0 <= pen_dark_saturation <= 1")
        if not self.fold_saturation_ratio > 0 or not self.fold_brightness_ratio > 0:
            raise InputError("fold_saturation_ratio and fold_brightness_ratio must be > 0")
        for name in ("min_sharpness", "min_sharpness_ratio"):
            value = getattr(self, name)
            if value is not None and not value >= 0:
                raise InputError(f"{name} must be >= 0, got {value}")
        for name in ("max_pen_fraction", "max_fold_fraction"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= 1:
                raise InputError(f"{name} must be in [0, 1], got {value}")


#: Stain normalisation methods (``none``: tiles as scanned).
STAIN_METHODS = ("none", "macenko", "reinhard")


@dataclass(frozen=True)
class StainParams:
    """Stain normalisation and augmentation of tiles before the encoder (:mod:`preprocessing.stain`).

    Every site of a federation must use the same method and reference: features of
    differently normalised tiles are different feature spaces, and training refuses the mix
    (the ``stain`` provenance attribute). ``reference`` None is the built-in reference
    (Macenko et al.'s published H&E vectors and maximum concentrations, torchstain's defaults).
    """

    method: str = "none"
    reference: str | None = None  # path of a reference image (PNG/JPEG/TIFF), None: the built-in one
    #: HED jitter (Tellez et al. 2018): each tile's H, E, D channels scaled by 1 + N(0, sigma) and
    #: shifted by N(0, sigma / 5); seeded by (seed, slide id, tile position), so reruns agree. 0: off.
    hed_jitter: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in STAIN_METHODS:
            raise InputError(f"stain method must be one of {', '.join(STAIN_METHODS)}, got {self.method!r}")
        if not 0 <= self.hed_jitter <= 1:
            raise InputError(f"hed_jitter must be in [0, 1], got {self.hed_jitter}")
        if self.reference is not None and self.method == "none":
            raise InputError("a stain reference needs a stain method (macenko or reinhard)")
