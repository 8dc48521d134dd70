"""Patch encoders: one registry of frozen networks by name, plus any TorchScript or ``torch.export`` file.

Why a registry: adding an encoder is one decorated factory function, and the
CLI, the pipeline and the benchmarks find it by name. Every model card of
:mod:`preprocessing.cards` built with timm or transformers is registered here
by one generic factory (:func:`build_network` + strict local loading from
:mod:`preprocessing.weights`). Why fingerprints: every feature file records
*which weights* produced it (``sha256:<hex>`` of the weights file, or
``random-init``), so features from different hospitals can be checked to come
from the same encoder before they are trained on together.

Weights are never downloaded (the tool must run on air-gapped hospital machines):
they come from ``weights=`` (a file or a folder), the site's weights catalogue
(``weights_dir=`` or ``$WSI_FL_WEIGHTS_DIR``), the model hub's local cache, or
for the ResNets torchvision's files in the local torch hub cache; otherwise
:class:`EncoderError` says where it looked and how to go on (``--weights``,
``--weights-dir`` or ``--random-init``).

The registered CNNs are the CLAM baseline: a torchvision ResNet cut after
``layer3`` and globally average-pooled. They are fully convolutional, so they take
tiles of any size (CLAM feeds 256 px tiles to a 224 px ImageNet model). For
inference the batch norms are folded into the convolutions and the model runs in
``channels_last``, which oneDNN executes faster on CPU; outputs equal the plain
model's up to float rounding. The ViTs of the cards take ``input_size`` only:
tiles of another size are resized (bilinear, antialiased).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from torch import nn

from wsi_fl._registry import Registry

from .cards import CARDS, ModelCard, list_cards
from .errors import EncoderError
from .programs import load_exported, load_program, load_torchscript
from .weights import check_blob, file_fingerprint, load_network, read_state_dict, resolve_weights, search_description

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "Encoder",
    "EncoderError",
    "create_encoder",
    "encoder_for_card",
    "file_fingerprint",
    "list_encoders",
    "load_exported",
    "load_torchscript",
    "register_encoder",
    "resnet_trunc",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RANDOM_INIT = "random-init"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class Encoder:
    """A frozen feature extractor and the input convention it was trained with.

    ``model`` maps a float NCHW batch, normalised by :meth:`preprocess`, to
    ``(batch, dim)`` features. ``fixed_input_size`` is set for models that only
    accept ``input_size`` inputs (ViTs, TorchScript and exported files), so
    :meth:`preprocess` resizes tiles of another size; CNN trunks take any size.
    ``precisions`` is the card's inference precision per device type: the model
    and its inputs are cast to it when moved (:meth:`to`), so what the features
    record (:attr:`precision`) is what ran.
    """

    name: str
    model: nn.Module
    dim: int
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    weights: str
    fixed_input_size: bool = False
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    card: str = ""  #: the model card's name; "" for a TorchScript/exported file
    precisions: Mapping[str, str] = field(default_factory=lambda: {"cpu": "fp32"})
    #: (scale, shift) per device, built once: on a GPU, two small tensors made per batch are two host-to-device
    #: copies that each wait for the queue, which a 5 000-tile slide pays 40 times.
    _norm: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict, repr=False,
                                                                         compare=False)

    def precision_on(self, device: str | torch.device) -> str:
        """``fp32``, ``fp16`` or ``bf16``: the precision this encoder runs in on ``device`` (fp32 if unlisted)."""
        return self.precisions.get(torch.device(device).type, "fp32")

    @property
    def precision(self) -> str:
        return self.precision_on(self.device)

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.precision]

    @property
    def transform(self) -> dict[str, Any]:
        """What :meth:`preprocess` does to a uint8 tile, as recorded in the feature files."""
        return {"resize": self.input_size if self.fixed_input_size else None, "interpolation": "bilinear",
                "antialias": True, "mean": list(self.mean), "std": list(self.std)}

    def to(self, device: str | torch.device) -> Encoder:
        """Move the model to ``device`` in that device's precision (in place) and return self."""
        self.device = torch.device(device)
        if set(self.precisions.values()) <= {"fp32"}:
            self.model.to(self.device)  # also TorchScript modules, which take no dtype
        else:
            self.model.to(self.device, self.dtype)
        return self

    def preprocess(self, batch: torch.Tensor) -> torch.Tensor:
        """uint8 ``(n, h, w, 3)`` tiles -> normalised NCHW in ``channels_last`` memory format, in :attr:`dtype`.

        ``permute`` of NHWC *is* a channels_last NCHW view, so this is one fused
        pass (convert, scale, shift) with no layout copy. Run it on the model's
        device: moving uint8 moves a quarter of the bytes.
        """
        if batch.dtype != torch.uint8 or batch.ndim != 4 or batch.shape[-1] != 3:
            raise ValueError(f"expected uint8 (n, h, w, 3) tiles, got {tuple(batch.shape)} {batch.dtype}")
        x = batch.permute(0, 3, 1, 2).to(torch.float32)
        if self.fixed_input_size and tuple(x.shape[-2:]) != (self.input_size, self.input_size):
            x = nn.functional.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear",
                                          antialias=True, align_corners=False)
        scale, shift = self._normalisation(x.device)
        x = x.mul_(scale).sub_(shift).contiguous(memory_format=torch.channels_last)
        return x if self.dtype == torch.float32 else x.to(self.dtype)

    def _normalisation(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """``x * scale - shift`` = ``(x / 255 - mean) / std``, as (1, 3, 1, 1) tensors on ``device``."""
        if device not in self._norm:
            std = torch.tensor(self.std, dtype=torch.float32).view(1, 3, 1, 1)
            mean = torch.tensor(self.mean, dtype=torch.float32).view(1, 3, 1, 1)
            self._norm[device] = ((1.0 / (255.0 * std)).to(device), (mean / std).to(device))
        return self._norm[device]

    @torch.inference_mode()
    def __call__(self, batch_uint8_nhwc: torch.Tensor) -> torch.Tensor:
        """Features of uint8 NHWC tiles (convenience for tests and small jobs)."""
        return self.model(self.preprocess(batch_uint8_nhwc.to(self.device)))


#: ``factory(weights, random_init) -> Encoder``; ``weights`` is an existing file or None (the factory
#: may then look in places of its own, as the ResNets do in the torch hub cache).
EncoderFactory = Callable[[Path | None, bool], Encoder]
ENCODERS: Registry[EncoderFactory] = Registry("encoder")


def register_encoder(name: str) -> Callable[[EncoderFactory], EncoderFactory]:
    """Decorator registering ``factory(weights: Path | None, random_init: bool) -> Encoder`` as ``name``."""
    return ENCODERS.register(name)


def list_encoders() -> list[str]:
    return ENCODERS.names()


def create_encoder(
    name_or_path: str | os.PathLike,
    *,
    weights: str | os.PathLike | None = None,
    random_init: bool = False,
    device: str | torch.device = "cpu",
    input_size: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    weights_dir: str | os.PathLike | None = None,
    precision: str | None = None,
) -> Encoder:
    """A registered encoder by name, or a TorchScript/``.pt2`` file by path, in eval mode on ``device``.

    ``weights`` is a file or a folder (snapshot or hub cache); without it the
    site catalogue (``weights_dir``, default ``$WSI_FL_WEIGHTS_DIR``) and the
    hub cache are searched. ``input_size``/``mean``/``std`` apply to files only
    (defaults: 224 px and ImageNet statistics); a registered encoder knows its own.
    ``precision`` (``fp32``, ``fp16``, ``bf16``) replaces the card's precision on ``device``'s type: e.g.
    ``bf16`` on a CPU with AVX512-BF16 or AMX, about 1.4-1.8x the fp32 throughput of a ViT here with features
    within cosine 0.999 of fp32's; the feature files record the precision that ran.
    """
    key = str(name_or_path)
    if precision is not None and precision not in DTYPES:
        raise EncoderError(f"unknown precision {precision!r}: use one of {', '.join(DTYPES)}")
    if weights is not None and random_init:
        raise EncoderError("give either --weights or --random-init, not both")
    if key in ENCODERS:
        if input_size is not None or mean is not None or std is not None:
            raise EncoderError(f"input_size/mean/std are fixed for the registered encoder {key!r}")
        path = None if random_init else _registered_weights(key, weights, weights_dir)
        encoder = ENCODERS.get(key)(path, random_init)
        encoder.model.eval().requires_grad_(False)
        if precision is not None:
            encoder.precisions = {**encoder.precisions, torch.device(device).type: precision}
        return encoder.to(device)
    if Path(key).is_file():
        if weights is not None or random_init:
            raise EncoderError(f"{Path(key).name} is a model file with its own weights; drop --weights/--random-init")
        if precision not in (None, "fp32"):
            raise EncoderError(f"{Path(key).name}: a TorchScript/exported program runs in the precision it was"
                               f" saved in; drop --precision {precision}")
        return load_program(key, device=device, input_size=input_size or 224, mean=mean or IMAGENET_MEAN,
                            std=std or IMAGENET_STD)
    raise EncoderError(f"unknown encoder {key!r}: use one of {', '.join(list_encoders())} (`wsi-fl encoders`"
                       " lists them) or the path of a TorchScript (.pt) or torch.export (.pt2) file")


def _registered_weights(name: str, weights: str | os.PathLike | None,
                        weights_dir: str | os.PathLike | None) -> Path | None:
    """The weight file for a registered encoder: given, or found locally through its card; None if not found."""
    if name not in CARDS:  # an encoder registered without a card: a file, or its factory's own search
        if weights is None:
            return None
        path = Path(weights).expanduser()
        if not path.is_file():
            raise EncoderError(f"weights file not found: {path}")
        return path
    card = CARDS.get(name)
    located = resolve_weights(card, weights, weights_dir)
    if located is not None:
        return located.path
    also: list[Path] = []
    if card.library == "torchvision":  # the ResNets also take torchvision's own files in the torch hub cache
        also.append(Path(torch.hub.get_dir()) / "checkpoints")
        if found := _find_hub_weights(card.weight_files):
            return found
    raise EncoderError(f"no weights for {card.name}: {search_description(card, weights_dir, also=also)};"
                       f" install the release of {card.repo_id} ({card.licence}, {card.licence_flag}) once as in"
                       " docs/hospital-runbook.md, or pass --weights FILE|DIR, or --random-init to try the tool")


# -- model cards (timm / transformers) -----------------------------------------------


def encoder_for_card(card: ModelCard, model: nn.Module, weights: str) -> Encoder:
    """The :class:`Encoder` of a network built from ``card`` (ViTs: fixed input size, card precision)."""
    return Encoder(name=card.name, model=model.eval().requires_grad_(False), dim=card.dim,
                   input_size=card.input_size, mean=tuple(card.mean), std=tuple(card.std), weights=weights,
                   fixed_input_size=True, card=card.name, precisions=dict(card.precision))


def _card_encoder(card: ModelCard, weights: Path | None, random_init: bool) -> Encoder:
    """Generic factory of a card: strict load from a local file, or a seeded random init (tests, demos)."""
    if random_init:
        from .foundation import build_network

        with torch.random.fork_rng(devices=[]):  # the caller's RNG state is left alone
            torch.manual_seed(0)
            return encoder_for_card(card, build_network(card), RANDOM_INIT)
    if weights is None:
        raise EncoderError(f"no weights for {card.name}: pass a weight file or random_init=True")
    fingerprint = file_fingerprint(weights)
    check_blob(weights, fingerprint)
    return encoder_for_card(card, load_network(card, weights), fingerprint)


def _register_cards() -> None:
    for card in list_cards():
        if card.library in ("timm", "transformers") and card.name not in ENCODERS:
            ENCODERS.register(card.name)(partial(_card_encoder, card))


# -- truncated ResNets (CLAM baseline) ---------------------------------------------


def _hub_checkpoint_names(weights_enum: object) -> list[str]:
    """File names torchvision's download would give each ImageNet weight set (V1 first: CLAM's)."""
    return [Path(urlparse(w.url).path).name for w in weights_enum]  # type: ignore[attr-defined]


def _find_hub_weights(names: Sequence[str]) -> Path | None:
    checkpoints = Path(torch.hub.get_dir()) / "checkpoints"
    for name in names:
        if (checkpoints / name).is_file():
            return checkpoints / name
    return None


def _check_hub_hash(path: Path, fingerprint: str) -> None:
    """torchvision file names end in the first hex digits of their SHA-256: catch a truncated download."""
    stem_hash = path.stem.rsplit("-", 1)[-1]
    digest = fingerprint.split(":", 1)[1]
    is_hash = len(stem_hash) >= 8 and all(c in "0123456789abcdef" for c in stem_hash)
    if is_hash and not digest.startswith(stem_hash):
        raise EncoderError(f"{path} is damaged (its SHA-256 does not start with {stem_hash}); delete it and"
                           " copy it again, or pass --weights")


def _fold_resnet_batchnorms(net: nn.Module) -> None:
    """Fold each eval-mode BatchNorm of a torchvision ResNet into the conv it follows (in place).

    Saves one memory-bound pass over every activation; explicit per block
    rather than generic, because only the ResNet forward guarantees conv -> bn.
    """
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    def fold(owner: nn.Module, conv: str, bn: str) -> None:
        setattr(owner, conv, fuse_conv_bn_eval(getattr(owner, conv), getattr(owner, bn)))
        setattr(owner, bn, nn.Identity())

    net.eval()
    fold(net, "conv1", "bn1")
    for layer in (net.layer1, net.layer2, net.layer3, net.layer4):
        for block in layer:
            for i in (1, 2, 3):
                if hasattr(block, f"bn{i}"):
                    fold(block, f"conv{i}", f"bn{i}")
            if block.downsample is not None:
                fold(block.downsample, "0", "1")


def resnet_trunc(arch: str, state_dict: dict[str, torch.Tensor] | None = None, *,
                 fold_bn: bool = False) -> nn.Sequential:
    """torchvision ``arch`` cut after layer3 + global average pool, in eval mode.

    The full network is built and the state_dict loaded strictly before cutting,
    so a weights file for another architecture fails loudly. ``fold_bn=False``
    gives the plain trunk a user would write (the benchmark's baseline).
    """
    from .tv import import_torchvision

    tv = import_torchvision()
    net = getattr(tv.models, arch)(weights=None)
    if state_dict is not None:
        net.load_state_dict(state_dict, strict=True)
    if fold_bn:
        _fold_resnet_batchnorms(net)
    return nn.Sequential(
        net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2, net.layer3,
        nn.AdaptiveAvgPool2d(1), nn.Flatten(1),
    ).eval()


def _resnet_trunc_encoder(name: str, arch: str, dim: int, weights_enum_name: str,
                          weights: Path | None, random_init: bool) -> Encoder:
    from .tv import import_torchvision

    if random_init:
        with torch.random.fork_rng(devices=[]):  # the caller's RNG state is left alone
            torch.manual_seed(0)
            model, fingerprint = resnet_trunc(arch, fold_bn=True), RANDOM_INIT
    else:
        names = _hub_checkpoint_names(getattr(import_torchvision().models, weights_enum_name))
        path = weights or _find_hub_weights(names)
        if path is None:
            where = Path(torch.hub.get_dir()) / "checkpoints"
            raise EncoderError(f"no weights for {name}: looked for {' or '.join(names)} in {where};"
                               " pass --weights FILE (a torchvision state_dict) or --random-init")
        fingerprint = file_fingerprint(path)
        if path.name in names:  # torchvision's names carry the file's hash: check it, wherever it was found
            _check_hub_hash(path, fingerprint)
        try:
            model = resnet_trunc(arch, read_state_dict(path), fold_bn=True)
        except RuntimeError as err:  # load_state_dict: missing/unexpected keys or wrong shapes
            raise EncoderError(f"{path} does not fit {arch}: {str(err).strip().splitlines()[0]}") from err
    model = model.to(memory_format=torch.channels_last)
    return Encoder(name=name, model=model, dim=dim, input_size=224, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                   weights=fingerprint, card=name)


@register_encoder("resnet50_trunc")
def resnet50_trunc(weights: Path | None, random_init: bool) -> Encoder:
    """ImageNet ResNet-50 to layer3, average-pooled: 1024-d (CLAM's default features)."""
    return _resnet_trunc_encoder("resnet50_trunc", "resnet50", 1024, "ResNet50_Weights", weights, random_init)


@register_encoder("resnet18_trunc")
def resnet18_trunc(weights: Path | None, random_init: bool) -> Encoder:
    """ImageNet ResNet-18 to layer3, average-pooled: 256-d (a fast encoder for tests and small machines)."""
    return _resnet_trunc_encoder("resnet18_trunc", "resnet18", 256, "ResNet18_Weights", weights, random_init)


_register_cards()
