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

__all__ = ["TilingParams", "TissueParams"]


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

    def __post_init__(self) -> None:
        if not self.mask_mpp > 0:
            raise InputError(f"mask_mpp must be > 0, got {self.mask_mpp}")
        if self.max_mask_side < 1:
            raise InputError(f"max_mask_side must be >= 1, got {self.max_mask_side}")
        if self.saturation_threshold is not None and not 0 <= self.saturation_threshold <= 1:
            raise InputError(f"saturation_threshold must be in [0, 1], got {self.saturation_threshold}")
        if not 0 <= self.min_saturation <= self.max_saturation <= 1:
            raise InputError("need 0 <= min_saturation <= max_saturation <= 1")
        for name in ("median_um", "closing_um", "opening_um", "min_region_um2", "max_hole_um2"):
            if getattr(self, name) < 0:
                raise InputError(f"{name} must be >= 0, got {getattr(self, name)}")
