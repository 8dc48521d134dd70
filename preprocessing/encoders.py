"""Patch encoders: a small registry of frozen CNN trunks plus any TorchScript file.

Why a registry: adding an encoder is one decorated factory function, and the
CLI, the pipeline and the benchmarks find it by name. Why fingerprints: every
feature file records *which weights* produced it (``sha256:<hex>`` of the weights
file, or ``random-init``), so features from different hospitals can be checked
to come from the same encoder before they are trained on together.

Weights are never downloaded (the tool must run on air-gapped hospital machines):
they come from ``weights=`` or from torchvision's files already in the local
torch hub cache; otherwise :class:`EncoderError` says where it looked and how to
go on (``--weights`` or ``--random-init``).

The registered CNNs are the CLAM baseline: a torchvision ResNet cut after
``layer3`` and globally average-pooled. They are fully convolutional, so they take
tiles of any size (CLAM feeds 256 px tiles to a 224 px ImageNet model). For
inference the batch norms are folded into the convolutions and the model runs in
``channels_last``, which oneDNN executes faster on CPU; outputs equal the plain
model's up to float rounding.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn

from wsi_fl._registry import Registry

from .errors import PreprocessingError

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "Encoder",
    "EncoderError",
    "create_encoder",
    "file_fingerprint",
    "list_encoders",
    "load_torchscript",
    "register_encoder",
    "resnet_trunc",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RANDOM_INIT = "random-init"


class EncoderError(PreprocessingError):
    """An encoder that cannot be built; ``str(err)`` is one line saying what to do."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


@dataclass
class Encoder:
    """A frozen feature extractor and the input convention it was trained with.

    ``model`` maps a float32 NCHW batch, normalised by :meth:`preprocess`, to
    ``(batch, dim)`` features. ``fixed_input_size`` is set for models that only
    accept ``input_size`` inputs (TorchScript files: we cannot know), so
    :meth:`preprocess` resizes tiles of another size; CNN trunks take any size.
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

    def to(self, device: str | torch.device) -> Encoder:
        """Move the model to ``device`` (in place) and return self."""
        self.device = torch.device(device)
        self.model.to(self.device)
        return self

    def preprocess(self, batch: torch.Tensor) -> torch.Tensor:
        """uint8 ``(n, h, w, 3)`` tiles -> normalised float32 NCHW in ``channels_last`` memory format.

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
        std = torch.tensor(self.std, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
        mean = torch.tensor(self.mean, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
        scale = 1.0 / (255.0 * std)
        return x.mul_(scale).sub_(mean / std).contiguous(memory_format=torch.channels_last)

    @torch.inference_mode()
    def __call__(self, batch_uint8_nhwc: torch.Tensor) -> torch.Tensor:
        """Features of uint8 NHWC tiles (convenience for tests and small jobs)."""
        return self.model(self.preprocess(batch_uint8_nhwc.to(self.device)))


#: ``factory(weights, random_init) -> Encoder``; ``weights`` is an existing file or None.
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
) -> Encoder:
    """A registered encoder by name, or a TorchScript file by path, in eval mode on ``device``.

    ``input_size``/``mean``/``std`` apply to TorchScript files only (defaults:
    224 px and ImageNet statistics); a registered encoder knows its own.
    """
    key = str(name_or_path)
    if weights is not None and random_init:
        raise EncoderError("give either --weights or --random-init, not both")
    if key in ENCODERS:
        if input_size is not None or mean is not None or std is not None:
            raise EncoderError(f"input_size/mean/std are fixed for the registered encoder {key!r}")
        path = _existing_weights(weights) if weights is not None else None
        encoder = ENCODERS.get(key)(path, random_init)
        encoder.model.eval().requires_grad_(False)
        return encoder.to(device)
    if Path(key).is_file():
        if weights is not None or random_init:
            raise EncoderError(f"{Path(key).name} is a TorchScript file with its own weights;"
                               " drop --weights/--random-init")
        return load_torchscript(key, device=device, input_size=input_size or 224,
                                mean=mean or IMAGENET_MEAN, std=std or IMAGENET_STD)
    raise EncoderError(f"unknown encoder {key!r}: use one of {', '.join(list_encoders())}"
                       " or the path of a TorchScript file")


def _existing_weights(weights: str | os.PathLike) -> Path:
    path = Path(weights).expanduser()
    if not path.is_file():
        raise EncoderError(f"weights file not found: {path}")
    return path


def file_fingerprint(path: str | os.PathLike) -> str:
    """``sha256:<hex>`` of a file, read in 1-MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return f"sha256:{h.hexdigest()}"


# -- TorchScript -------------------------------------------------------------------


def load_torchscript(
    path: str | os.PathLike,
    *,
    device: str | torch.device = "cpu",
    input_size: int = 224,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> Encoder:
    """Any TorchScript model mapping ``(n, 3, s, s)`` normalised images to ``(n, dim)`` features.

    The feature dimension is found by one dummy forward at ``input_size``.
    """
    path = Path(path)
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise EncoderError(f"mean and std need 3 values each (std > 0), got {tuple(mean)} and {tuple(std)}")
    try:
        with warnings.catch_warnings():  # torch >= 2.10 deprecates TorchScript, but it is the format we take
            warnings.filterwarnings("ignore", "`torch.jit.load` is deprecated", DeprecationWarning)
            model = torch.jit.load(str(path), map_location=torch.device(device))
    except (RuntimeError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise EncoderError(f"{path.name} is not a loadable TorchScript file: {first}") from err
    model.eval()
    dummy = torch.zeros(1, 3, input_size, input_size, device=torch.device(device))
    try:
        with torch.inference_mode():
            out = model(dummy)
    except Exception as err:  # a scripted model can raise anything
        raise EncoderError(f"{path.name} fails on a 1x3x{input_size}x{input_size} input"
                           f" (set the input size): {type(err).__name__}: {str(err).strip()[:200]}") from err
    if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[0] != 1:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise EncoderError(f"{path.name} must return a (batch, dim) tensor, returned {shape}")
    return Encoder(
        name=path.name, model=model, dim=int(out.shape[1]), input_size=input_size,
        mean=tuple(float(v) for v in mean), std=tuple(float(v) for v in std),
        weights=file_fingerprint(path), fixed_input_size=True, device=torch.device(device),
    )


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


def _load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle, zip and torch errors all mean "not a usable weights file"
        detail = f"{type(err).__name__}: {str(err).strip()[:200]}"
        raise EncoderError(f"cannot read weights {path}: {detail}") from err
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise EncoderError(f"{path} holds a {type(state).__name__}, not a state_dict")
    return state


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
        if weights is None:
            _check_hub_hash(path, fingerprint)
        try:
            model = resnet_trunc(arch, _load_state_dict(path), fold_bn=True)
        except RuntimeError as err:  # load_state_dict: missing/unexpected keys or wrong shapes
            raise EncoderError(f"{path} does not fit {arch}: {str(err).strip().splitlines()[0]}") from err
    model = model.to(memory_format=torch.channels_last)
    return Encoder(name=name, model=model, dim=dim, input_size=224, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                   weights=fingerprint)


@register_encoder("resnet50_trunc")
def resnet50_trunc(weights: Path | None, random_init: bool) -> Encoder:
    """ImageNet ResNet-50 to layer3, average-pooled: 1024-d (CLAM's default features)."""
    return _resnet_trunc_encoder("resnet50_trunc", "resnet50", 1024, "ResNet50_Weights", weights, random_init)


@register_encoder("resnet18_trunc")
def resnet18_trunc(weights: Path | None, random_init: bool) -> Encoder:
    """ImageNet ResNet-18 to layer3, average-pooled: 256-d (a fast encoder for tests and small machines)."""
    return _resnet_trunc_encoder("resnet18_trunc", "resnet18", 256, "ResNet18_Weights", weights, random_init)
