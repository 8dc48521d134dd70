"""A trained model on disk: weights, the config that rebuilds it, its classes, and its feature space.

A MIL head is only meaningful on the features it was trained on: the same
encoder, weights, magnification and tile size. The checkpoint records those
feature-file attributes (``provenance``) so that inference can refuse features
from another space (:func:`check_provenance`) instead of predicting garbage.

The file is a ``torch.save`` of plain Python types and tensors only, loaded with
``weights_only=True``: opening a checkpoint never executes pickled code.
Saving is atomic (temp file, fsync, ``os.replace``), so a crash never leaves a
half-written file under the final name.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.base import MILModel
from models.config import MILConfig
from models.registry import create_model
from preprocessing.h5format import attr_equal
from wsi_fl.errors import ConfigError

#: Feature-file attributes that define the feature space a model was trained on. ``stain`` is the
#: stain normalisation/augmentation identity (method, reference digest, jitter): tiles normalised
#: differently give different features, so sites that did so cannot be pooled.
PROVENANCE_KEYS = ("encoder", "weights", "feature_dim", "target_mpp", "tile_size", "schema_version", "stain")

#: What a key missing from older feature files or checkpoints means (files written before stain
#: normalisation existed were not normalised).
PROVENANCE_DEFAULTS = {"stain": "none"}

FORMAT = "wsi-fl-mil-checkpoint"
FORMAT_VERSION = 1


class CheckpointError(ConfigError):
    """A checkpoint that is missing, unreadable, or does not rebuild its model. One-line message."""


class ProvenanceError(ConfigError):
    """Features from another feature space than the checkpoint's (other encoder, magnification, ...)."""


@dataclass
class Checkpoint:
    config: MILConfig
    state_dict: dict[str, torch.Tensor]
    classes: list[str]  # class index -> original label value, as a string
    provenance: dict[str, Any]  # subset of PROVENANCE_KEYS, from the training feature files
    meta: dict[str, Any]  # free-form training info (epochs, seed, metrics, package version, created)


def provenance_value(attrs: Mapping[str, Any], key: str) -> Any:
    """``attrs[key]``, or what its absence means (:data:`PROVENANCE_DEFAULTS`; None for other keys)."""
    value = attrs.get(key)
    return PROVENANCE_DEFAULTS.get(key) if value is None else value


def provenance_from_attrs(attrs: Mapping[str, Any]) -> dict[str, Any]:
    """The :data:`PROVENANCE_KEYS` present in a feature file's attributes, as plain Python values."""
    return {k: _plain(attrs[k], f"provenance[{k!r}]") for k in PROVENANCE_KEYS if k in attrs}


def save_checkpoint(
    path: str | os.PathLike,
    model: MILModel,
    classes: list[str],
    provenance: Mapping[str, Any],
    meta: Mapping[str, Any],
) -> Path:
    """Write ``model`` with its classes, provenance and meta to ``path`` atomically; returns the path.

    Everything is validated and converted before the file is opened, so a bad
    argument fails without touching an existing checkpoint.
    """
    path = Path(path)
    classes = list(classes)
    if not all(isinstance(c, str) for c in classes):
        raise ValueError(f"classes must be strings (the original label values), got {classes!r}")
    if len(classes) != model.config.n_classes:
        raise ValueError(f"{len(classes)} classes {classes!r} for a model with n_classes={model.config.n_classes}")
    extra = sorted(set(provenance) - set(PROVENANCE_KEYS))
    if extra:
        # Per-slide attributes (slide_id, created, ...) would make every other slide "mismatch".
        raise ValueError(f"provenance keys {extra} are not feature-space keys {PROVENANCE_KEYS}")
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "config": model.config.to_dict(),
        "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "classes": classes,
        "provenance": _plain(dict(provenance), "provenance"),
        "meta": _plain(dict(meta), "meta"),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            torch.save(payload, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)
    return path


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> tuple[MILModel, Checkpoint]:
    """Rebuild the model (``create_model(config)``, strict ``load_state_dict``), in eval mode on ``map_location``.

    Any problem (missing file, not a checkpoint, truncated, weights that do not
    fit the config) raises :class:`CheckpointError` with a one-line message.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # zip/pickle/EOF/unsafe-type errors all mean "not a readable checkpoint"
        raise CheckpointError(f"{path}: not a readable checkpoint ({_first_line(err)})") from err
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a wsi-fl MIL checkpoint (no {FORMAT!r} marker)")
    if payload.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format version {payload.get('format_version')!r} (this version reads {FORMAT_VERSION})"
        )
    try:
        ckpt = Checkpoint(
            config=MILConfig.from_dict(payload["config"]),
            state_dict=payload["state_dict"],
            classes=list(payload["classes"]),
            provenance=dict(payload["provenance"]),
            meta=dict(payload["meta"]),
        )
        model = create_model(ckpt.config)
        model.load_state_dict(ckpt.state_dict, strict=True)
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"{path}: checkpoint does not rebuild its model ({_first_line(err)})") from err
    return model.to(map_location).eval(), ckpt


def check_provenance(expected: Mapping[str, Any], found: Mapping[str, Any], source: str, *,
                     expected_from: str = "checkpoint") -> None:
    """Raise :class:`ProvenanceError` naming ``source`` and every key where ``found`` differs from ``expected``.

    ``expected`` is the checkpoint's provenance (or, across sites, the first
    site's: ``expected_from`` names it), ``found`` a feature file's
    attributes. Keys absent from ``expected`` are not checked (an older
    checkpoint may record fewer; but see below); a key in ``expected`` but missing from
    ``found`` is a mismatch, except for a key of :data:`PROVENANCE_DEFAULTS` (``stain``), whose
    absence (or None) on either side means its default. Floats (``target_mpp``) compare with a relative
    tolerance, since they pass through HDF5 and JSON.
    """
    mismatches = []
    for key in [*expected, *(k for k in PROVENANCE_DEFAULTS if k not in expected)]:
        want = _plain(provenance_value(expected, key), key)
        if key not in found and key not in PROVENANCE_DEFAULTS:
            mismatches.append(f"{key}: {expected_from} {want!r} vs features (missing)")
            continue
        have = _plain(provenance_value(found, key), key)
        if not attr_equal(want, have):
            mismatches.append(f"{key}: {expected_from} {want!r} vs features {have!r}")
    if mismatches:
        space = "the model's" if expected_from == "checkpoint" else f"{expected_from}'s"
        hint = ("; features must come from the same weight file (its sha256) everywhere: install the same"
                " release at every site (`wsi-fl encoders` shows where it is)"
                if any(m.startswith("weights:") for m in mismatches) else "")
        if any(m.startswith("stain:") for m in mismatches):
            hint += ("; every site must preprocess with the same `wsi-fl preprocess --stain/--stain-reference/"
                     "--hed-jitter` settings (the feature files' stain attribute)")
        raise ProvenanceError(f"{source}: features do not match {space} feature space: {'; '.join(mismatches)}{hint}")


def _plain(value: Any, where: str) -> Any:
    """``value`` as the plain types ``torch.load(weights_only=True)`` accepts; TypeError naming ``where`` if not.

    Feature-file attributes arrive as numpy scalars and bytes; stored as such,
    they would make the checkpoint unloadable with ``weights_only=True``.
    """
    if isinstance(value, np.generic | np.ndarray):  # before str/float: np.str_, np.float64 subclass them
        return _plain(value.tolist(), where)
    if value is None or type(value) in (bool, int, float, str):
        return value
    for base in (bool, int, float, str):  # IntEnum, str subclasses: unpickling them would need their class
        if isinstance(value, base):
            return base(value)
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise TypeError(f"{where}: keys must be strings, got {k!r}")
            out[k] = _plain(v, f"{where}[{k!r}]")
        return out
    if isinstance(value, list | tuple):
        return [_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
    raise TypeError(f"{where}: {type(value).__name__} cannot be stored in a checkpoint (plain types and tensors only)")


def _first_line(err: BaseException) -> str:
    """A one-line reason. torch's weights-only errors are paragraphs advising ``weights_only=False``
    (wrong for a file that is simply not a checkpoint); their actual reason follows a marker."""
    text = str(err)
    marker = "WeightsUnpickler error:"
    if marker in text:
        text = text.split(marker, 1)[1].split(". Please use", 1)[0]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # some platforms/filesystems cannot open directories; the rename is still atomic
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
