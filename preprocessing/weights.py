"""Encoder weights from local files only: where they are found, and how they are loaded strictly.

Why: hospitals are air-gapped, so weights are copied once from an approved
machine and never downloaded (the most common complaint about other tools is
that they fetch from a model hub). A site installs them in one of these forms,
and every tool finds them the same way:

* ``--weights FILE`` (``.safetensors``, or a ``.bin``/``.pth``/``.pt`` state
  dict, possibly wrapped in ``{"state_dict": ...}`` or ``{"model": ...}``);
* ``--weights DIR``: a model-hub snapshot directory holding the card's file
  names, or a hub cache (``models--ORG--NAME/snapshots/REV/``, following
  ``refs/main``; files there are symlinks into ``blobs/``);
* a catalogue, ``--weights-dir DIR`` or ``$WSI_FL_WEIGHTS_DIR``, looked up as
  ``DIR/weights.json`` (``{"card name": "path", ...}``, relative to ``DIR``),
  then ``DIR/<card name>/<weight file>``, then a hub cache in ``DIR``;
* last, the model hub's own cache (``$HF_HUB_CACHE``), read as plain files.

Finding is standard library only (``wsi-fl encoders`` lists what is installed
without importing torch). Loading builds the network on the ``meta`` device,
memory-maps the file and hands its tensors to the network (``assign=True``), so
peak memory stays about one copy of the weights. Keys and shapes are compared
before anything is loaded: a file made for another network is refused in one
line with counts and an example of each difference, never half-loaded.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import EncoderError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from .cards import ModelCard

__all__ = [
    "ENV_VAR",
    "MAP_FILE",
    "Located",
    "catalogue_description",
    "check_fit",
    "file_fingerprint",
    "find_local",
    "hub_dir_name",
    "load_network",
    "read_state_dict",
    "resolve_weights",
    "search_description",
    "select_keys",
]

ENV_VAR = "WSI_FL_WEIGHTS_DIR"
MAP_FILE = "weights.json"


@dataclass(frozen=True)
class Located:
    """A weight file and how it was found (shown by ``wsi-fl encoders``)."""

    path: Path
    source: str  #: ``--weights``, ``weights.json``, ``catalogue``, ``hub cache``...


def file_fingerprint(path: str | os.PathLike) -> str:
    """``sha256:<hex>`` of a file, read in 1-MiB blocks (what feature files record as ``weights``)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return f"sha256:{h.hexdigest()}"


def check_blob(path: Path, fingerprint: str) -> None:
    """A hub-cache file is a symlink to ``blobs/<sha256>``: catch a damaged or truncated copy."""
    target = Path(os.path.realpath(path)).name
    if len(target) == 64 and all(c in "0123456789abcdef" for c in target) and fingerprint != f"sha256:{target}":
        raise EncoderError(f"{path} is damaged: its SHA-256 is not the {target[:12]}... its hub cache names;"
                           " copy it again")


# -- finding (standard library only) ---------------------------------------------------------


def hub_dir_name(repo_id: str) -> str | None:
    """``ORG/NAME`` -> ``models--ORG--NAME`` (the hub cache's folder), None for a repo id of another form."""
    parts = repo_id.split("/")
    if len(parts) != 2 or not all(parts) or " " in repo_id or ":" in repo_id:
        return None
    return f"models--{parts[0]}--{parts[1]}"


def _snapshots(models_dir: Path) -> list[Path]:
    """The snapshots of a ``models--ORG--NAME`` folder, ``refs/main``'s first, then newest first."""
    snaps = models_dir / "snapshots"
    if not snaps.is_dir():
        return []
    found = sorted((p for p in snaps.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime, reverse=True)
    ref = models_dir / "refs" / "main"
    if ref.is_file():
        main = snaps / ref.read_text(encoding="utf-8").strip()
        if main in found:
            found.remove(main)
            found.insert(0, main)
    return found


def _hub_model_dirs(card: ModelCard, directory: Path) -> list[Path]:
    dirs = [directory] if directory.name.startswith("models--") else []
    if name := hub_dir_name(card.repo_id):
        dirs += [directory / name, directory / "hub" / name]  # a hub cache root, or HF_HOME above it
    return dirs


def _in_directory(card: ModelCard, directory: Path) -> Path | None:
    """The card's preferred weight file in a snapshot-like folder or in a hub cache layout inside it."""
    folders = chain([directory], (s for d in _hub_model_dirs(card, directory) for s in _snapshots(d)))
    for folder in folders:
        for name in card.weight_files:
            if (folder / name).is_file():
                return folder / name
    return None


def _catalogue(weights_dir: str | os.PathLike | None, environ: Mapping[str, str]) -> tuple[Path, str] | None:
    """The site's weights folder and what named it, or None; a named folder that does not exist is an error."""
    if weights_dir is not None:
        root, what = Path(weights_dir).expanduser(), "--weights-dir"
    elif environ.get(ENV_VAR):
        root, what = Path(environ[ENV_VAR]).expanduser(), f"${ENV_VAR}"
    else:
        return None
    if not root.is_dir():
        raise EncoderError(f"{what} {root} is not a directory")
    return root, what


def hub_cache(environ: Mapping[str, str] = os.environ) -> Path:
    """The model hub's local cache folder, as its own client computes it (never contacted)."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if environ.get(var):
            return Path(environ[var]).expanduser()
    if environ.get("HF_HOME"):
        return Path(environ["HF_HOME"]).expanduser() / "hub"
    return Path(environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "huggingface" / "hub"


def torch_hub_checkpoints(environ: Mapping[str, str] = os.environ) -> Path:
    """Where torchvision keeps its downloads (``torch.hub.get_dir()/checkpoints``), computed without torch."""
    home = environ.get("TORCH_HOME") or str(Path(environ.get("XDG_CACHE_HOME") or "~/.cache") / "torch")
    return Path(home).expanduser() / "hub" / "checkpoints"


def _mapped(card: ModelCard, root: Path) -> Path | None:
    table_path = root / MAP_FILE
    if not table_path.is_file():
        return None
    try:
        table = json.loads(table_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise EncoderError(f"{table_path} is not readable JSON ({err})") from err
    if not isinstance(table, dict) or not all(isinstance(v, str) for v in table.values()):
        raise EncoderError(f"{table_path} must be a JSON object of encoder name -> path")
    if card.name not in table:
        return None
    target = root / Path(table[card.name]).expanduser()  # an absolute path stays absolute
    found = target if target.is_file() else _in_directory(card, target) if target.is_dir() else None
    if found is None:
        raise EncoderError(f"{table_path} maps {card.name} to {target}, which is not a weight file or a folder"
                           f" holding {' or '.join(card.weight_files)}")
    return found


def find_local(card: ModelCard, weights_dir: str | os.PathLike | None = None,
               environ: Mapping[str, str] = os.environ) -> Located | None:
    """The installed weights of ``card``: the site catalogue first, then the hub cache; None if absent."""
    if catalogue := _catalogue(weights_dir, environ):
        root, _ = catalogue
        if found := _mapped(card, root):
            return Located(found, MAP_FILE)
        if (root / card.name).is_dir() and (found := _in_directory(card, root / card.name)):
            return Located(found, "catalogue")
        if any(d != root for d in _hub_model_dirs(card, root)) and (found := _in_directory(card, root)):
            return Located(found, "catalogue (hub layout)")
    cache = hub_cache(environ)
    if (name := hub_dir_name(card.repo_id)) and (found := _in_directory(card, cache / name)):
        return Located(found, "hub cache")
    if card.library == "torchvision" and (found := _in_directory(card, torch_hub_checkpoints(environ))):
        return Located(found, "torch hub cache")
    return None


def resolve_weights(card: ModelCard, weights: str | os.PathLike | None = None,
                    weights_dir: str | os.PathLike | None = None,
                    environ: Mapping[str, str] = os.environ) -> Located | None:
    """``--weights`` (a file or a folder) if given, else :func:`find_local`; a given path must hold weights."""
    if weights is None:
        return find_local(card, weights_dir, environ)
    path = Path(weights).expanduser()
    if path.is_file():
        return Located(path, "--weights")
    if path.is_dir():
        if found := _in_directory(card, path):
            return Located(found, "--weights")
        raise EncoderError(f"{path} holds no weights for {card.name}: looked for {' or '.join(card.weight_files)}"
                           f" there and in a hub cache layout (models--ORG--NAME/snapshots/REV/) inside it")
    raise EncoderError(f"weights file not found: {path}")


def catalogue_description(weights_dir: str | os.PathLike | None = None,
                          environ: Mapping[str, str] = os.environ) -> str:
    """The weights catalogue in use, in words: ``$WSI_FL_WEIGHTS_DIR /srv/weights``, or that there is none."""
    if catalogue := _catalogue(weights_dir, environ):
        root, what = catalogue
        return f"{what} {root}"
    return f"no weights catalogue: --weights-dir and ${ENV_VAR} not set"


def search_description(card: ModelCard, weights_dir: str | os.PathLike | None = None,
                       environ: Mapping[str, str] = os.environ, also: Sequence[str | os.PathLike] = ()) -> str:
    """Where :func:`find_local` looked (after the places ``also``), in words, for a "no weights" error."""
    places = [str(p) for p in also]
    hub = hub_dir_name(card.repo_id)
    if _catalogue(weights_dir, environ):
        layouts = ", ".join(filter(None, (MAP_FILE, f"{card.name}/", hub and f"{hub}/")))
        places.insert(0, f"{catalogue_description(weights_dir, environ)} ({layouts})")
    if hub:
        places.append(f"the hub cache {hub_cache(environ) / hub}")
    where = f"in {'; '.join(places)}" if places else "nowhere"
    note = "" if _catalogue(weights_dir, environ) else f" ({catalogue_description(weights_dir, environ)})"
    return f"looked for {' or '.join(card.weight_files)} {where}{note}"


# -- loading (torch) -------------------------------------------------------------------------


def _first_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return f"{type(err).__name__}: {lines[0][:200]}" if lines else type(err).__name__


def _is_safetensors(path: Path) -> bool:
    """By content, since a hub blob has no suffix: an 8-byte header length, then the JSON header."""
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{"


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a weight file, memory-mapped (nothing is copied until used), on the CPU."""
    import torch

    path = Path(path)
    try:
        if _is_safetensors(path):
            from safetensors.torch import load_file

            state: Any = load_file(str(path), device="cpu")
        else:
            try:
                state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
            except RuntimeError as err:  # files of the pre-zip format cannot be mapped: read them whole
                if "mmap" not in str(err):
                    raise
                state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle, zip, safetensors and torch errors all mean "not a usable weights file"
        raise EncoderError(f"cannot read weights {path}: {_first_line(err)}") from err
    for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise EncoderError(f"{path} holds a {type(state).__name__} that is not a state dict of tensors")
    return state


def select_keys(card: ModelCard, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The network's part of a release: keys under ``card.key_prefix``, prefix stripped.

    Keys outside the prefix belong to other parts of a release (a text tower, a
    head) and are not the encoder's; if no key has the prefix, all are kept, so
    a file of another layout shows up as unexpected keys rather than as nothing.
    """
    prefix = card.key_prefix
    if not prefix or not any(k.startswith(prefix) for k in state):
        return dict(state)
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def check_fit(card: ModelCard, path: Path, expected: Mapping[str, torch.Size],
              found: Mapping[str, torch.Tensor]) -> None:
    """Raise :class:`EncoderError` (one line, counts and one example each) unless keys and shapes match."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    shaped = [k for k in expected if k in found and tuple(found[k].shape) != tuple(expected[k])]
    if not (missing or unexpected or shaped):
        return
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
    if shaped:
        k = shaped[0]
        parts.append(f"{len(shaped)} of another shape (e.g. {k}: file {tuple(found[k].shape)},"
                     f" network {tuple(expected[k])})")
    prefix = f" after removing the prefix {card.key_prefix!r}" if card.key_prefix else ""
    raise EncoderError(f"{path} does not fit encoder {card.name} ({card.arch}): of {len(expected)} keys,"
                       f" {', '.join(parts)}{prefix}; is it the release of another encoder?")


def load_network(card: ModelCard, path: str | os.PathLike, *, depth: int | None = None) -> nn.Module:
    """``build_network(card)`` holding the weights of ``path``, strictly, in eval mode on the CPU.

    The network is built on ``meta`` (no memory, no random init) and takes the
    file's memory-mapped tensors as its own, so loading costs about one copy of
    the weights. ``depth`` is for tests (a reduced network and its checkpoint).
    """
    from .foundation import build_network

    path = Path(path)
    net = build_network(card, device="meta", depth=depth)
    expected = net.trunk.state_dict()
    state = select_keys(card, read_state_dict(path))
    check_fit(card, path, {k: v.shape for k, v in expected.items()}, state)
    for k, v in state.items():  # assign=True keeps the file's dtype: match the network's (e.g. fp16 releases)
        if v.dtype != expected[k].dtype:
            state[k] = v.to(expected[k].dtype)
    net.trunk.load_state_dict(state, strict=True, assign=True)
    _materialise_buffers(net, lambda: _cpu_twin(card, depth))
    return net.eval().requires_grad_(False)


def _meta_tensors(module: nn.Module, recurse: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
    pairs = chain(module.named_parameters(recurse=recurse), module.named_buffers(recurse=recurse))
    return ((name, t) for name, t in pairs if t.is_meta)


def _materialise_buffers(net: nn.Module, twin: Callable[[], nn.Module]) -> None:
    """Non-persistent buffers (rotary tables...) are not in any file: compute them after a ``meta`` build.

    timm's layers recompute theirs (``init_non_persistent_buffers``); anything
    else is copied from a CPU-built twin, which costs a random init but is exact.
    """
    import torch

    for module in net.modules():
        if hasattr(module, "init_non_persistent_buffers") and any(True for _ in _meta_tensors(module, False)):
            for name, buf in module._buffers.items():  # only the meta ones: the loaded weights stay
                if buf is not None and buf.is_meta:
                    module._buffers[name] = torch.empty_like(buf, device="cpu")
            module.init_non_persistent_buffers()
    left = dict(_meta_tensors(net))
    if not left:
        return
    built = twin()
    values = dict(chain(built.named_parameters(), built.named_buffers()))
    for name in left:
        owner, _, attr = name.rpartition(".")
        module = net.get_submodule(owner)
        if attr in module._buffers:
            module._buffers[attr] = values[name]
        else:
            raise EncoderError(f"parameter {name} of the network is in no weight file")


def _cpu_twin(card: ModelCard, depth: int | None) -> nn.Module:
    import torch

    from .foundation import build_network

    with torch.random.fork_rng(devices=[]):
        return build_network(card, device="cpu", depth=depth)
