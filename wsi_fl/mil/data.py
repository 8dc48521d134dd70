"""Bags for attention-MIL: slide labels, per-slide feature files, instance tables, and padded batches.

Everything that can be wrong with the inputs is checked where it is cheapest and
reported as one line naming the file or slide, so a run over hundreds of slides
fails at start-up with the cause rather than at epoch 7 with a shape error:

* :func:`read_labels` checks the label CSV as a whole (columns, duplicates, unknown classes).
* :class:`FeatureBagDataset` checks every feature file's attributes at construction
  (existence, schema, zero tiles, one encoder/resolution across all slides) without
  reading features; the features themselves are read lazily per item and checked
  for NaN/Inf then, because scanning every bag up front would read the whole cohort.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from torch.utils.data import Dataset

from models.checkpoint import PROVENANCE_KEYS, ProvenanceError, check_provenance, provenance_value
from preprocessing.h5format import COORDS, FEATURES, FeatureFileError, attr_equal, check_feature_file
from wsi_fl.errors import ConfigError

SPLIT_NAMES = ("train", "val", "test")


class BagDataError(ConfigError):
    """Bad bag input (labels, feature files, tables); ``str()`` is one line naming the file or slide."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))  # one line, whatever the wrapped error printed


@dataclass(frozen=True)
class BagRecord:
    """One slide: its label, the class index of that label, its patient and optional predefined split.

    A survival record (:func:`wsi_fl.mil.survival_data.read_survival_records`) also has ``time`` and ``event``;
    its ``label``/``target`` are the event ("0"/"1", 0/1), so that splits are stratified by event status.
    """

    slide_id: str
    label: str
    target: int
    patient_id: str
    split: str | None
    time: float | None = None
    event: bool | None = None


@dataclass(frozen=True)
class LabelTable:
    """The parsed label CSV; ``classes[record.target] == record.label``."""

    records: list[BagRecord]
    classes: list[str]


def sort_classes(labels: Sequence[str]) -> list[str]:
    """Unique labels in a stable order: by numeric value when all are numbers ("2" before "10"), else lexicographic.

    The order fixes the class index, so it must not depend on row order in the file.
    """
    unique = set(labels)
    try:
        values = {label: float(label) for label in unique}
    except ValueError:
        return sorted(unique)
    if any(math.isnan(v) for v in values.values()):
        return sorted(unique)
    return sorted(unique, key=lambda label: (values[label], label))


def read_labels(path: str | Path, *, label_col: str = "label", classes: Sequence[str] | None = None) -> LabelTable:
    """Read ``slide_id,<label_col>[,patient_id][,split]``; other columns are ignored.

    ``patient_id`` (column absent or cell empty) defaults to the slide id, i.e. one
    patient per slide. ``split``, when present, must be ``train``/``val``/``test`` or
    empty (no predefined split for that slide).

    Slides of one patient may carry different labels: labels are per slide (a
    primary tumour and a metastasis of the same patient differ), and the patient-level
    splits keep such slides together whatever their labels.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as err:
        raise BagDataError(f"{path}: cannot read label file ({err})") from err
    reader = csv.DictReader(io.StringIO(text))
    header = [h.strip() for h in reader.fieldnames or []]
    if not header:
        raise BagDataError(f"{path}: empty label file (expected a header slide_id,{label_col},...)")
    reader.fieldnames = header
    missing = [c for c in ("slide_id", label_col) if c not in header]
    if missing:
        raise BagDataError(f"{path}: missing column(s) {', '.join(missing)} (header: {','.join(header)})")
    rows: list[tuple[int, str, str, str, str | None]] = []
    seen: dict[str, int] = {}
    for row in reader:
        line = reader.line_num
        cells = {k: (v or "").strip() for k, v in row.items() if k is not None}
        if not any(cells.values()):
            continue  # blank line
        slide_id, label = cells["slide_id"], cells[label_col]
        if not slide_id:
            raise BagDataError(f"{path}:{line}: empty slide_id")
        if not label:
            raise BagDataError(f"{path}:{line}: slide {slide_id}: empty {label_col}")
        if slide_id in seen:
            raise BagDataError(f"{path}:{line}: duplicate slide_id {slide_id} (first on line {seen[slide_id]})")
        seen[slide_id] = line
        split = cells.get("split") or None
        if split is not None and split not in SPLIT_NAMES:
            raise BagDataError(f"{path}:{line}: slide {slide_id}: split {split!r} not one of {SPLIT_NAMES}")
        rows.append((line, slide_id, label, cells.get("patient_id") or slide_id, split))
    if not rows:
        raise BagDataError(f"{path}: no slides in label file")

    if classes is None:
        class_list = sort_classes([r[2] for r in rows])
    else:
        class_list = [str(c) for c in classes]
        if len(set(class_list)) != len(class_list) or not class_list:
            raise BagDataError(f"{path}: classes must be unique and non-empty, got {class_list}")
    index = {c: i for i, c in enumerate(class_list)}
    records = []
    for line, slide_id, label, patient_id, split in rows:
        if label not in index:
            raise BagDataError(f"{path}:{line}: slide {slide_id}: {label_col} {label!r} not in classes {class_list}")
        records.append(BagRecord(slide_id, label, index[label], patient_id, split))
    return LabelTable(records, class_list)


@dataclass
class Bag:
    """One bag: ``features`` (N, D) float32, ``coords`` (N, 2) int64 for slides, ``None`` for tables.

    Survival bags also carry ``time``/``event`` and ``stratum`` (the site index in pooled training: Cox risk
    sets never cross it); classification bags leave ``time``/``event`` None.
    """

    features: torch.Tensor
    target: int
    slide_id: str
    coords: torch.Tensor | None = None
    time: float | None = None
    event: bool | None = None
    stratum: int = 0


class FeatureBagDataset(Dataset):
    """Slides as bags, read lazily from ``features_dir/<slide_id>.h5``.

    All slides must share the :data:`PROVENANCE_KEYS` attributes (one feature
    space); ``expected_provenance`` (a checkpoint's) is checked against them with
    :func:`models.checkpoint.check_provenance`.

    ``max_instances`` caps a bag at a random subset (without replacement) that is
    redrawn every epoch, a cheap augmentation that also bounds memory for huge
    slides. The draw uses ``numpy.random.default_rng((seed, epoch, i))``, so it is
    the same for a given (seed, epoch, item) in any process or worker. Call
    :meth:`set_epoch` before iterating; with ``DataLoader(persistent_workers=True)``
    workers keep their copy of the epoch, so use non-persistent workers.
    """

    def __init__(
        self,
        records: Sequence[BagRecord],
        features_dir: str | Path,
        *,
        max_instances: int | None = None,
        seed: int = 0,
        expected_provenance: Mapping[str, Any] | None = None,
        cache_bytes: int = 2 << 30,
        stratum: int = 0,
    ) -> None:
        if max_instances is not None and max_instances < 1:
            raise ValueError(f"max_instances must be >= 1 or None, got {max_instances}")
        self.records = list(records)
        if not self.records:
            raise BagDataError(f"no slides given for feature directory {features_dir}")
        self.features_dir = Path(features_dir)
        self.max_instances = max_instances
        self.seed = seed
        self.stratum = int(stratum)  # survival: the site index, so pooled Cox risk sets stay within a site
        # Training reads every bag once per epoch: keeping decompressed bags (up to this many bytes in all)
        # makes epochs after the first free of HDF5 decompression. 0 disables the cache.
        self.cache_bytes = int(cache_bytes)
        self._cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._cached_bytes = 0
        self.epoch = 0
        self.paths: list[Path] = []
        self.n_tiles: list[int] = []
        first: tuple[str, dict[str, Any]] | None = None
        for rec in self.records:
            path = self.features_dir / f"{rec.slide_id}.h5"
            if not path.exists():
                raise BagDataError(f"slide {rec.slide_id}: no feature file {path}")
            try:
                info = check_feature_file(path)
            except FeatureFileError as err:
                raise BagDataError(f"slide {rec.slide_id}: {err}") from err
            if info.n_tiles == 0:
                raise BagDataError(f"slide {rec.slide_id}: zero tiles in {path} (no tissue found?)")
            if first is None:
                first = (rec.slide_id, info.attrs)
            else:
                for key in PROVENANCE_KEYS:
                    a, b = provenance_value(first[1], key), provenance_value(info.attrs, key)
                    if not attr_equal(a, b):
                        raise BagDataError(f"slides {first[0]} and {rec.slide_id} differ in {key}: {a!r} vs {b!r}")
            self.paths.append(path)
            self.n_tiles.append(info.n_tiles)
        assert first is not None
        self.provenance: dict[str, Any] = {k: provenance_value(first[1], k) for k in PROVENANCE_KEYS}
        if expected_provenance is not None:
            try:
                check_provenance(expected_provenance, self.provenance, f"feature files in {self.features_dir}")
            except ProvenanceError as err:
                raise BagDataError(str(err)) from err
        self.feature_dim = int(self.provenance["feature_dim"])
        self.targets = np.array([r.target for r in self.records], dtype=np.int64)
        self.groups = np.array([r.patient_id for r in self.records])
        if all(r.time is not None for r in self.records):
            self.times = np.array([r.time for r in self.records], dtype=np.float64)
            self.events = np.array([bool(r.event) for r in self.records])
            self.strata = np.full(len(self.records), self.stratum, dtype=np.int64)

    def set_epoch(self, epoch: int) -> None:
        """Select the instance subsets of ``epoch`` (only matters with ``max_instances``)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.records)

    def _load(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """The whole bag (features float32, coords), from the in-memory cache when it fits the budget."""
        cached = self._cache.get(i)
        if cached is not None:
            return cached
        rec, path = self.records[i], self.paths[i]
        n, dim = self.n_tiles[i], self.feature_dim
        try:
            with h5py.File(path, "r") as f:
                feats, coords = f[FEATURES][()], f[COORDS][()]
        except (OSError, KeyError) as err:
            raise BagDataError(f"slide {rec.slide_id}: cannot read {path} ({err})") from err
        if feats.shape != (n, dim) or coords.shape != (n, 2):
            raise BagDataError(
                f"slide {rec.slide_id}: {path} changed since validation"
                f" (features {feats.shape}, coords {coords.shape}, expected ({n}, {dim}))"
            )
        # Whole bag checked, not just the drawn subset: the error must not depend on the epoch.
        if not np.isfinite(feats).all():
            bad = int((~np.isfinite(feats)).any(axis=1).sum())
            raise BagDataError(f"slide {rec.slide_id}: NaN/Inf features in {bad} of {n} tiles of {path}")
        feats = np.ascontiguousarray(feats, dtype=np.float32)
        coords = np.ascontiguousarray(coords, dtype=np.int64)
        if self._cached_bytes + feats.nbytes <= self.cache_bytes:
            self._cache[i] = (feats, coords)
            self._cached_bytes += feats.nbytes
        return feats, coords

    def __getitem__(self, i: int) -> Bag:
        rec, n = self.records[i], self.n_tiles[i]
        feats, coords = self._load(i)
        if self.max_instances is not None and n > self.max_instances:
            rng = np.random.default_rng((self.seed, self.epoch, i))
            keep = np.sort(rng.choice(n, self.max_instances, replace=False))
            feats, coords = feats[keep], coords[keep]
        return Bag(features=torch.from_numpy(feats), target=rec.target, slide_id=rec.slide_id,
                   coords=torch.from_numpy(coords), time=rec.time, event=rec.event, stratum=self.stratum)


@dataclass
class BagBatch:
    """Bags padded to the longest: ``x`` (B, Nmax, D), ``mask`` (B, Nmax) True on real instances.

    ``time`` (B,) float64, ``event`` (B,) bool and ``stratum`` (B,) long for survival bags; None otherwise.
    """

    x: torch.Tensor
    mask: torch.Tensor
    targets: torch.Tensor
    slide_ids: list[str]
    time: torch.Tensor | None = None
    event: torch.Tensor | None = None
    stratum: torch.Tensor | None = None


def collate_bags(bags: list[Bag]) -> BagBatch:
    """``DataLoader`` collate function: zero-pad bags of different sizes and mark the real rows."""
    if not bags:
        raise ValueError("collate_bags: empty batch")
    dims = {b.features.shape[1] for b in bags}
    if len(dims) != 1:
        raise BagDataError(f"collate_bags: bags of different feature dims {sorted(dims)} in one batch")
    n_max = max(b.features.shape[0] for b in bags)
    x = bags[0].features.new_zeros((len(bags), n_max, dims.pop()))
    mask = torch.zeros((len(bags), n_max), dtype=torch.bool)
    for j, b in enumerate(bags):
        n = b.features.shape[0]
        x[j, :n] = b.features
        mask[j, :n] = True
    survival = [b.time is not None for b in bags]
    if any(survival) and not all(survival):
        raise BagDataError("collate_bags: survival and classification bags in one batch")
    return BagBatch(
        x=x,
        mask=mask,
        targets=torch.tensor([b.target for b in bags], dtype=torch.long),
        slide_ids=[b.slide_id for b in bags],
        time=torch.tensor([b.time for b in bags], dtype=torch.float64) if all(survival) else None,
        event=torch.tensor([bool(b.event) for b in bags], dtype=torch.bool) if all(survival) else None,
        stratum=torch.tensor([b.stratum for b in bags], dtype=torch.long) if all(survival) else None,
    )


def __getattr__(name: str) -> Any:
    # The instance-table datasets live in wsi_fl.mil.tables (this module is about slides; that one imports Bag
    # from here), served lazily so that ``from wsi_fl.mil.data import TableBagDataset`` keeps working.
    if name == "TableBagDataset":
        from wsi_fl.mil.tables import TableBagDataset

        return TableBagDataset
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
