"""The per-slide feature file: the one definition of its layout, writer, reader and validity check.

Layout (schema version :data:`SCHEMA_VERSION`)::

    /features   (N, D) float32 or float16, chunked by rows, deflate + shuffle
    /coords     (N, 2) int64, level-0 top-left (x, y) of each tile
    attrs       provenance, see :data:`REQUIRED_ATTRS`

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
)

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

    def append(self, coords: np.ndarray, features: np.ndarray) -> None:
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
        self.n = n

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
        if key in PARAMETER_ATTRS and not attr_equal(info.attrs.get(key), _attr_value(value)):
            return f"{key} changed ({info.attrs.get(key)!r} -> {_attr_value(value)!r})"
    return None


def read_features(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Load a whole (validated) feature file: ``(features, coords, attrs)``."""
    info = check_feature_file(path)
    with h5py.File(path, "r") as f:
        return f[FEATURES][()], f[COORDS][()], info.attrs


def remove_stale_partials(directory: str | os.PathLike, name: str) -> int:
    """Delete ``.<name>.*.partial`` files left by killed runs; returns how many."""
    removed = 0
    for p in Path(directory).glob(f".{name}.*.partial"):
        p.unlink(missing_ok=True)
        removed += 1
    return removed
