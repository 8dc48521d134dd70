"""Encoders a hospital brings as one file: a TorchScript model or a ``torch.export`` program (``.pt2``).

Why both: TorchScript is deprecated from torch 2.10 on but is what existing
sites have; ``torch.export`` programs are its successor. Either file holds its
own weights, so the fingerprint recorded in the features is the file's. The
feature dimension is learnt from one dummy forward; any failure is one line.

An exported program runs with the shapes it was exported for: the input side is
fixed (tiles are resized to ``input_size``), and the batch dimension must have
been exported as dynamic, which the dummy forward (batch of 2) checks.
"""

from __future__ import annotations

import logging
import os
import warnings
import zipfile
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .errors import EncoderError
from .weights import file_fingerprint

if TYPE_CHECKING:
    from collections.abc import Iterator

    from .encoders import Encoder

__all__ = ["load_exported", "load_program", "load_torchscript"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
EXPORT_HINT = "torch.export.export(model, (x,), dynamic_shapes={'x': {0: torch.export.Dim('batch')}})"


def _first(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0][:200]}" if text else type(err).__name__


def _check_stats(mean: Sequence[float], std: Sequence[float]) -> None:
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise EncoderError(f"mean and std need 3 values each (std > 0), got {tuple(mean)} and {tuple(std)}")


@contextmanager
def _quiet_export_logs() -> Iterator[None]:
    """``torch.export.load`` logs a traceback before raising on a bad file; the user gets our one line instead."""
    loggers = [logging.getLogger(name) for name in ("torch.export", "torch.export.pt2_archive._package")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _probe(path: Path, model: Any, input_size: int, device: torch.device, batch: int) -> int:
    """The feature dimension, from one forward of ``batch`` zero images; one-line errors otherwise."""
    dummy = torch.zeros(batch, 3, input_size, input_size, device=device)
    try:
        with torch.inference_mode():
            out = model(dummy)
    except Exception as err:  # a scripted or exported model can raise anything
        if batch > 1 and path.suffix == ".pt2" and "size()[0]" in str(err):
            raise EncoderError(f"{path.name} was exported for one batch size; export it with a dynamic batch:"
                               f" {EXPORT_HINT}") from err
        raise EncoderError(f"{path.name} fails on a {batch}x3x{input_size}x{input_size} input"
                           f" (set the input size): {_first(err)}") from err
    if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[0] != batch:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise EncoderError(f"{path.name} must return a (batch, dim) tensor, returned {shape}")
    return int(out.shape[1])


def _encoder(path: Path, model: nn.Module, dim: int, input_size: int, mean: Sequence[float],
             std: Sequence[float], device: torch.device) -> Encoder:
    from .encoders import Encoder

    return Encoder(
        name=path.name, model=model, dim=dim, input_size=input_size,
        mean=tuple(float(v) for v in mean), std=tuple(float(v) for v in std),
        weights=file_fingerprint(path), fixed_input_size=True, device=device,
    )


def load_torchscript(
    path: str | os.PathLike,
    *,
    device: str | torch.device = "cpu",
    input_size: int = 224,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> Encoder:
    """Any TorchScript model mapping ``(n, 3, s, s)`` normalised images to ``(n, dim)`` features."""
    path, device = Path(path), torch.device(device)
    _check_stats(mean, std)
    try:
        with warnings.catch_warnings():  # torch >= 2.10 deprecates TorchScript, but it is a format we take
            warnings.filterwarnings("ignore", "`torch.jit.load` is deprecated", DeprecationWarning)
            model = torch.jit.load(str(path), map_location=device)
    except (RuntimeError, ValueError) as err:
        raise EncoderError(f"{path.name} is not a loadable TorchScript file: {_first(err)}") from err
    model.eval()
    dim = _probe(path, model, input_size, device, batch=1)
    return _encoder(path, model, dim, input_size, mean, std, device)


def load_exported(
    path: str | os.PathLike,
    *,
    device: str | torch.device = "cpu",
    input_size: int = 224,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> Encoder:
    """A ``torch.export`` program (``torch.export.save``) mapping normalised images to ``(n, dim)`` features.

    The program keeps the train/eval mode it was exported in (export it in eval mode).
    """
    path, device = Path(path), torch.device(device)
    _check_stats(mean, std)
    if not zipfile.is_zipfile(path):
        raise EncoderError(f"{path.name} is not a torch.export program (.pt2 written by torch.export.save)")
    try:
        with _quiet_export_logs():
            model = torch.export.load(str(path)).module()
    except Exception as err:  # deserialisation raises many types; all mean "not a usable program"
        raise EncoderError(f"{path.name} is not a loadable torch.export program: {_first(err)}") from err
    model.requires_grad_(False).to(device)
    dim = _probe(path, model, input_size, device, batch=2)
    return _encoder(path, model, dim, input_size, mean, std, device)


def load_program(path: str | os.PathLike, **kw: Any) -> Encoder:
    """``.pt2`` -> :func:`load_exported`, anything else -> :func:`load_torchscript`."""
    return (load_exported if Path(path).suffix.lower() == ".pt2" else load_torchscript)(path, **kw)
