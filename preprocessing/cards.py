"""Model cards: what each patch encoder is, where its weights come from, and on what terms.

Standard library only: ``wsi-fl encoders`` lists the catalogue and ``wsi-fl
preprocess`` takes its tile size and µm/px defaults from a card without
importing torch, timm or transformers. The networks are built from these facts
by :mod:`preprocessing.foundation` (torch side), one encoder registry entry per
card.

Why cards: a hospital's security officer and a researcher both need to read,
before anything runs, which architecture a name means, which weight files it
expects, under which licence, and what a feature vector is (the CLS token, or
CLS ⊕ the mean of the patch tokens for Virchow-style models, register tokens
dropped). Names follow TRIDENT's where one exists, so scripts carry over.
Architecture facts come from the public model cards and release notes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal, get_args

from preprocessing._card_catalogue import ENTRIES
from wsi_fl._registry import Registry

__all__ = ["CARDS", "ModelCard", "get_card", "list_cards", "register_card"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

Library = Literal["timm", "transformers", "torchvision"]
#: ``cls``: the class token; ``cls+mean``: class token ⊕ mean of the patch tokens (register tokens
#: excluded); ``mean``: mean of the patch tokens; ``pooled``: the network's own pooled output
#: (CNN trunks, models with an attention pooler).
Pooling = Literal["cls", "cls+mean", "mean", "pooled"]
Precision = Literal["fp32", "fp16", "bf16"]


@dataclass(frozen=True)
class ModelCard:
    """The public facts about one patch encoder (one registry entry)."""

    name: str  #: registry name (TRIDENT's where one exists)
    title: str  #: human-readable name, e.g. "UNI (ViT-L/16, MahmoodLab)"
    library: Library  #: the well-kept library whose public definition builds it
    arch: str  #: timm model name, transformers config class, or torchvision function
    dim: int  #: feature dimension after pooling
    input_size: int  #: side in px the network sees
    tile_size: int  #: recommended tile side in px at ``mpp`` (resized to ``input_size`` if different)
    mpp: float  #: native resolution in µm/px (0.5 ≈ 20×)
    pooling: Pooling
    repo_id: str  #: where the release lives (model-hub id or URL)
    licence: str  #: SPDX id or the licence's name
    commercial: bool  #: whether the licence allows commercial use
    gated: bool  #: whether access to the release needs an approved request
    weight_files: tuple[str, ...]  #: file names of the release, preferred first
    #: arguments of the public definition (timm ``create_model`` kwargs or the transformers config's);
    #: plain data only: layers are named (``"swiglu_packed"``, ``"silu"``) and resolved on the torch side
    arch_kwargs: Mapping[str, Any] = field(default_factory=dict)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    #: inference precision per device type; CPU stays fp32 (no fast half precision on most hospital CPUs)
    precision: Mapping[str, Precision] = field(default_factory=lambda: {"cpu": "fp32", "cuda": "fp16"})
    #: prefix the release puts before the network's state-dict keys (stripped when loading)
    key_prefix: str = ""
    #: a pooling head the release puts on top of the trunk (``pooling="pooled"``), by name in
    #: :mod:`preprocessing.foundation`, e.g. ``conch_attn_pool``; empty for plain trunks
    head: str = ""
    params_m: float = 0.0  #: parameters in millions (for memory planning; large ones are tested on ``meta``)
    reference: str = ""  #: URL of the public model card / paper
    notes: str = ""  #: anything a user must know (e.g. "trained at mixed magnifications")

    def __post_init__(self) -> None:
        object.__setattr__(self, "arch_kwargs", MappingProxyType(dict(self.arch_kwargs)))
        object.__setattr__(self, "precision", MappingProxyType(dict(self.precision)))
        problems = [f"{k} must be > 0" for k in ("dim", "input_size", "tile_size", "mpp") if not getattr(self, k) > 0]
        if not self.weight_files:
            problems.append("weight_files is empty")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            problems.append("mean/std need 3 values each, std > 0")
        if self.library not in get_args(Library):
            problems.append(f"library {self.library!r} is not one of {get_args(Library)}")
        if self.pooling not in get_args(Pooling):
            problems.append(f"pooling {self.pooling!r} is not one of {get_args(Pooling)}")
        if self.head and self.pooling != "pooled":
            problems.append("a head pools by itself: pooling must be 'pooled'")
        if not set(self.precision.values()) <= set(get_args(Precision)) or "cpu" not in self.precision:
            problems.append(f"precision needs a 'cpu' entry and values in {get_args(Precision)}")
        if any("/" in f or "\\" in f for f in self.weight_files):
            problems.append("weight_files are file names, not paths")
        if problems:
            raise ValueError(f"model card {self.name!r}: {'; '.join(problems)}")

    @property
    def licence_flag(self) -> str:
        """``commercial`` or ``non-commercial``, plus ``gated`` where access must be requested."""
        use = "commercial" if self.commercial else "non-commercial"
        return f"{use}, gated" if self.gated else use


CARDS: Registry[ModelCard] = Registry("encoder card")


def register_card(card: ModelCard) -> ModelCard:
    """Add ``card`` to the catalogue (a duplicate name is refused) and return it."""
    CARDS.register(card.name)(card)
    return card


def get_card(name: str) -> ModelCard:
    """The card called ``name``; an unknown name raises :class:`wsi_fl._registry.UnknownNameError`."""
    return CARDS.get(name)


def list_cards() -> list[ModelCard]:
    return [CARDS.get(n) for n in CARDS.names()]


# -- the catalogue -------------------------------------------------------------------
# The facts live in ``_card_catalogue`` (plain dicts, grouped by publisher, each with the
# ``reference`` they come from); registering them here keeps the dataclass the only place
# that validates a card.

for _entry in ENTRIES:
    register_card(ModelCard(**_entry))
del _entry
