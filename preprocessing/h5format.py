"""The per-slide feature file: the one definition of its layout, writer, reader and validity check.

Layout (schema version :data:`SCHEMA_VERSION`)::

    /features   (N, D) float32 or float16, chunked by rows, deflate + shuffle
    /coords     (N, 2) int64, level-0 top-left (x, y) of each tile
    /qc/<measure>            (N,) float32, optional: per-tile QC of the kept tiles (blur, pen_fraction, ...)
    /qc_excluded/coords      (M, 2) int64, optional: tiles QC excluded before the encoder
    /qc_excluded/reason      (M,) uint8 bits (:data:`preprocessing.artifacts.REASONS`)
    /qc_excluded/<measure>   (M,) float32
    attrs       provenance, see :data:`REQUIRED_ATTRS`; optionally ``qc_params``,
                ``qc_excluded`` (counts by reason), ``qc_sharpness``, ``stain``, ``stain_params``

The ``qc*`` groups and the stain attributes were added within schema version 1: they are
optional, so files written before them still read (no QC, ``stain`` "none": :data:`ATTR_DEFAULTS`),
and readers that do not know them ignore them.

``features`` and ``coords`` sit at the root so CLAM-style loaders read the file
as is. Deflate (gzip) rather than LZF so that any HDF5 reader, not only h5py,
can decompress it.

A file is never visible under its final name until it is complete: the writer
streams batches into ``.<name>.<pid>.partial`` in the same directory, then
flushes, re-opens and verifies it, fsyncs and renames. A crash or ``kill -9``
at any moment leaves at most a ``.partial`` file, which no reader opens and the
next run deletes. Readers and re-runs also check ``status == "complete"`` and the
row counts, so even a file copied half-way by hand is not mistaken for done.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from .errors import PreprocessingError

SCHEMA_VERSION = 1
FEATURES = "features"
COORDS = "coords"
QC = "qc"
QC_EXCLUDED = "qc_excluded"
COMPLETE = "complete"

#: Attributes every feature file carries (besides ``schema_version``, ``status``, ``n_tiles``).
REQUIRED_ATTRS = (
    "slide_id",
    "source_file",
    "source_size",
    "source_fingerprint",
    "mpp",
    "mpp_source",
    "target_mpp",
    "tile_size",
    "tile_size_level0",
    "stride",
    "read_level",
    "min_tissue",
    "tissue_params",
    "encoder",
    "feature_dim",
    "weights",
    "feature_dtype",
    "package_version",
    "created",
)

#: Attributes whose change makes an existing file stale (a re-run redoes it).
PARAMETER_ATTRS = (
    "source_size",
    "source_fingerprint",
    "mpp",
    "mpp_source",
    "target_mpp",
    "tile_size",
    "stride",
    "min_tissue",
    "tissue_params",
    "encoder",
    "weights",
    "feature_dtype",
    "qc_params",
    "stain",
    "precision",  # a re-run in another precision (--precision bf16) redoes the files rather than mixing them
)

#: Values of optional attributes in files written before they existed.
ATTR_DEFAULTS = {"stain": "none", "precision": "fp32"}

_CHUNK_BYTES = 1 << 20  # ~1 MiB chunks: efficient for both row slices and whole-bag reads


class FeatureFileError(PreprocessingError):
    """A feature file that is missing, incomplete, corrupt or of an unknown schema."""


def _attr_value(value: Any) -> Any:
    if isinstance(value, Mapping):
        return json.dumps(value, sort_keys=True)
    if isinstance(value, Path):
        return str(value)
    return value


def _python_value(value: Any) -> Any:
    """HDF5 attribute -> plain Python (``str``/``int``/``float``), so attrs compare and print simply."""
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.generic):
        return value.item()
    return value


def attr_equal(a: Any, b: Any) -> bool:
    """Attribute values equal, floats within a relative 1e-6 (they pass through HDF5 and JSON).

    The one comparison used for staleness, for consistency across slides and
    for checkpoint provenance, so "same feature space" means one thing.
    """
    a, b = _python_value(a), _python_value(b)
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, float) or isinstance(b, float):
        numbers = all(isinstance(v, int | float) for v in (a, b))
        return numbers and math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-12)
    return a == b


class FeatureWriter:
    """Stream (coords, features) batches into a feature file that appears only when complete.

    Use as a context manager; :meth:`append` each batch, then :meth:`commit`.
    Leaving the block without committing (an exception, Ctrl-C, SIGTERM)
    deletes the partial file.
    """

    def __init__(
        self, path: str | os.PathLike, dim: int, attrs: Mapping[str, Any], dtype: str = "float32"
    ) -> None:
        self.path = Path(path)
        self.dim = int(dim)
        self.dtype = np.dtype(dtype)
        if self.dtype not in (np.float32, np.float16):
            raise ValueError(f"feature dtype must be float32 or float16, not {dtype}")
        missing = [k for k in REQUIRED_ATTRS if k not in attrs and k not in ("feature_dim", "feature_dtype")]
        if missing:
            raise ValueError(f"feature file attributes missing: {missing}")
        self.tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.partial")
        self.n = 0
        self._attrs = {k: _attr_value(v) for k, v in attrs.items()}
        self._attrs.update(feature_dim=self.dim, feature_dtype=self.dtype.name)
        self._file: h5py.File | None = None
        self.n_excluded = 0

    def __enter__(self) -> FeatureWriter:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        f = h5py.File(self.tmp, "w")
        try:
            self._create_layout(f)
        except BaseException:  # an interrupt here would skip __exit__: clean up the partial file ourselves
            f.close()
            self.tmp.unlink(missing_ok=True)
            raise
        self._file = f
        return self

    def _create_layout(self, f: h5py.File) -> None:
        rows = max(1, _CHUNK_BYTES // (self.dim * self.dtype.itemsize))
        f.create_dataset(
            FEATURES, shape=(0, self.dim), maxshape=(None, self.dim), dtype=self.dtype,
            chunks=(rows, self.dim), compression="gzip", compression_opts=4, shuffle=True,
        )
        f.create_dataset(
            COORDS, shape=(0, 2), maxshape=(None, 2), dtype=np.int64,
            chunks=(4096, 2), compression="gzip", compression_opts=4, shuffle=True,
        )
        f.attrs.update(self._attrs)
        f.attrs["schema_version"] = SCHEMA_VERSION
        f.attrs["status"] = "writing"

    def append(self, coords: np.ndarray, features: np.ndarray, qc: Mapping[str, np.ndarray] | None = None) -> None:
        """Add a batch; ``qc``: per-tile measures of these tiles (the same names in every batch)."""
        if self._file is None:
            raise RuntimeError("FeatureWriter used outside its with-block")
        coords = np.asarray(coords, dtype=np.int64)
        features = np.asarray(features)
        if features.ndim != 2 or features.shape[1] != self.dim or coords.shape != (len(features), 2):
            raise ValueError(f"batch shapes coords {coords.shape}, features {features.shape} (dim {self.dim})")
        with np.errstate(over="ignore"):  # overflow is reported below, as one clear error
            features = features.astype(self.dtype, copy=False)
        if not np.isfinite(features).all():  # checked after the cast: float16 overflows to Inf above 65504
            raise ValueError(f"encoder produced NaN/Inf features (stored as {self.dtype.name})")
        n = self.n + len(features)
        for name, data in ((FEATURES, features), (COORDS, coords)):
            ds = self._file[name]
            ds.resize(n, axis=0)
            ds[self.n : n] = data
        if qc:
            group = self._file.require_group(QC)
            if self.n and set(group) != set(qc):
                raise ValueError(f"QC measures {sorted(qc)} differ from earlier batches' {sorted(group)}")
            for name, values in qc.items():
                _grow(group, name, np.asarray(values, np.float32), self.n, (len(features),))
        self.n = n

    def update_attrs(self, **attrs: Any) -> None:
        """Add attributes known only at the end (e.g. QC counts); before :meth:`commit`."""
        if self._file is None:
            raise RuntimeError("FeatureWriter used outside its with-block")
        self._file.attrs.update({k: _attr_value(v) for k, v in attrs.items()})

    def exclude(self, coords: np.ndarray, reasons: np.ndarray, measures: Mapping[str, np.ndarray]) -> None:
        """Record tiles that QC excluded (never embedded): coordinates, reason bits, measures."""
        if self._file is None:
            raise RuntimeError("FeatureWriter used outside its with-block")
        coords = np.asarray(coords, np.int64).reshape(-1, 2)
        if not len(coords):
            return
        group = self._file.require_group(QC_EXCLUDED)
        m = len(coords)
        _grow(group, COORDS, coords, self.n_excluded, (m, 2))
        _grow(group, "reason", np.asarray(reasons, np.uint8), self.n_excluded, (m,))
        for name, values in measures.items():
            _grow(group, name, np.asarray(values, np.float32), self.n_excluded, (m,))
        self.n_excluded += m

    def commit(self) -> Path:
        """Finish: mark complete, verify what was written, fsync, rename into place."""
        if self._file is None:
            raise RuntimeError("FeatureWriter used outside its with-block")
        self._file.attrs["n_tiles"] = self.n
        self._file.attrs["status"] = COMPLETE
        self._file.close()
        self._file = None
        check_feature_file(self.tmp)  # re-open from disk: what we rename is what a reader gets
        with open(self.tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(self.tmp, self.path)
        dir_fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        return self.path

    def __exit__(self, *exc: object) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        self.tmp.unlink(missing_ok=True)


def _grow(group: h5py.Group, name: str, data: np.ndarray, at: int, shape: tuple[int, ...]) -> None:
    """Append ``data`` (of ``shape``) to the resizable dataset ``group[name]`` at row ``at``."""
    if data.shape != shape:
        raise ValueError(f"{group.name}/{name}: batch of shape {data.shape}, expected {shape}")
    if name not in group:
        group.create_dataset(name, shape=(0, *shape[1:]), maxshape=(None, *shape[1:]), dtype=data.dtype,
                             chunks=(4096, *shape[1:]), compression="gzip", compression_opts=4, shuffle=True)
    ds = group[name]
    if ds.shape[0] != at:
        raise ValueError(f"{group.name}/{name}: has {ds.shape[0]} rows, expected {at}")
    ds.resize(at + len(data), axis=0)
    ds[at:] = data


@dataclass(frozen=True)
class FeatureFileInfo:
    path: Path
    n_tiles: int
    attrs: dict[str, Any]


def check_feature_file(path: str | os.PathLike) -> FeatureFileInfo:
    """Open and validate a feature file's structure; raises :class:`FeatureFileError` naming the problem."""
    path = Path(path)
    if not path.exists():
        raise FeatureFileError(f"{path}: no such feature file")
    try:
        with h5py.File(path, "r") as f:
            attrs = {k: _python_value(v) for k, v in f.attrs.items()}
            version = attrs.get("schema_version")
            if version != SCHEMA_VERSION:
                raise FeatureFileError(f"{path}: unknown schema version {version!r} (expected {SCHEMA_VERSION})")
            if attrs.get("status") != COMPLETE:
                raise FeatureFileError(f"{path}: incomplete (status {attrs.get('status')!r})")
            missing = [k for k in REQUIRED_ATTRS if k not in attrs]
            if missing:
                raise FeatureFileError(f"{path}: attributes missing: {', '.join(missing)}")
            if FEATURES not in f or COORDS not in f:
                raise FeatureFileError(f"{path}: missing '{FEATURES}' or '{COORDS}' dataset")
            n_feat, dim = f[FEATURES].shape
            n_coords = f[COORDS].shape[0]
            if not (n_feat == n_coords == attrs.get("n_tiles")) or dim != attrs["feature_dim"]:
                raise FeatureFileError(
                    f"{path}: inconsistent sizes (features {f[FEATURES].shape}, coords {n_coords},"
                    f" n_tiles {attrs.get('n_tiles')}, feature_dim {attrs['feature_dim']})"
                )
            for name, ds in (f[QC].items() if QC in f else ()):
                if ds.shape != (n_feat,):
                    raise FeatureFileError(f"{path}: {QC}/{name} has shape {ds.shape}, expected ({n_feat},)")
            if QC_EXCLUDED in f:
                m = f[QC_EXCLUDED][COORDS].shape[0] if COORDS in f[QC_EXCLUDED] else -1
                bad = [k for k, ds in f[QC_EXCLUDED].items() if ds.shape[0] != m]
                if m < 0 or bad:
                    raise FeatureFileError(f"{path}: {QC_EXCLUDED} is inconsistent ({', '.join(bad) or 'no coords'})")
    except OSError as err:
        raise FeatureFileError(f"{path}: not a readable HDF5 file ({err})") from err
    return FeatureFileInfo(path, int(n_feat), attrs)


def stale_reason(path: str | os.PathLike, expected: Mapping[str, Any]) -> str | None:
    """Why an existing output cannot be reused for these parameters, or ``None`` if it can."""
    try:
        info = check_feature_file(path)
    except FeatureFileError as err:
        return str(err)
    for key, value in expected.items():
        have = info.attrs.get(key, ATTR_DEFAULTS.get(key))
        if key in PARAMETER_ATTRS and not attr_equal(have, _attr_value(value)):
            return f"{key} changed ({have!r} -> {_attr_value(value)!r})"
    return None


def read_features(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Load a whole (validated) feature file: ``(features, coords, attrs)``."""
    info = check_feature_file(path)
    with h5py.File(path, "r") as f:
        return f[FEATURES][()], f[COORDS][()], info.attrs


@dataclass(frozen=True)
class TileQC:
    """A feature file's per-tile QC: measures of the kept tiles and the excluded tiles (empty if none)."""

    measures: dict[str, np.ndarray]  #: name -> (N,) float32, rows as ``features``
    excluded_coords: np.ndarray  #: (M, 2) int64
    excluded_reason: np.ndarray  #: (M,) uint8 bits
    excluded_measures: dict[str, np.ndarray]  #: name -> (M,) float32


def read_qc(path: str | os.PathLike) -> TileQC:
    """The per-tile QC of a (validated) feature file; files written without QC give empty arrays."""
    check_feature_file(path)
    with h5py.File(path, "r") as f:
        measures = {k: ds[()] for k, ds in f[QC].items()} if QC in f else {}
        ex = f.get(QC_EXCLUDED, {})
        coords = ex[COORDS][()] if COORDS in ex else np.zeros((0, 2), np.int64)
        reason = ex["reason"][()] if "reason" in ex else np.zeros(0, np.uint8)
        others = {k: ds[()] for k, ds in ex.items() if k not in (COORDS, "reason")}
    return TileQC(measures, coords, reason, others)


def remove_stale_partials(directory: str | os.PathLike, name: str) -> int:
    """Delete ``.<name>.*.partial`` files left by killed runs; returns how many."""
    removed = 0
    for p in Path(directory).glob(f".{name}.*.partial"):
        p.unlink(missing_ok=True)
        removed += 1
    return removed
