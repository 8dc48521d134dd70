"""Bags from instance tables (the classic MIL benchmarks, and one-instance survival tables), held in memory.

Split from :mod:`wsi_fl.mil.data` (slides from HDF5 files); re-exported there. A table has one row per instance,
``label,bag,f0,f1,...`` for classification or ``time,event,bag,f0,...`` for survival, and every problem is one
line naming the file and row.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from wsi_fl.errors import ConfigError
from wsi_fl.mil.data import Bag, BagDataError, sort_classes

__all__ = ["TableBagDataset"]


class TableBagDataset(Dataset):
    """Bags from an instance table (the classic MIL benchmarks), held in memory.

    :meth:`subset` returns another ``TableBagDataset`` (sharing the tensors) rather
    than a ``torch.utils.data.Subset``, so ``targets``/``groups``/``classes`` stay
    available for nested splitting. Survival tables also give ``times``/``events``
    (``targets`` are then the events, classes ``["0", "1"]``).
    """

    def __init__(
        self, features: Sequence[torch.Tensor], targets: Sequence[int], bag_ids: Sequence[str], classes: Sequence[str],
        times: Sequence[float] | None = None, events: Sequence[bool] | None = None,
    ) -> None:
        if not (len(features) == len(targets) == len(bag_ids)):
            raise ValueError("features, targets and bag_ids must have the same length")
        self.features = list(features)
        self.targets = np.asarray(targets, dtype=np.int64)
        self.groups = np.asarray([str(b) for b in bag_ids])
        self.classes = list(classes)
        self.feature_dim = int(self.features[0].shape[1]) if self.features else 0
        if (times is None) != (events is None):
            raise ValueError("times and events go together")
        if times is not None and events is not None:
            self.times = np.asarray(times, dtype=np.float64)
            self.events = np.asarray(events, dtype=bool)
            self.strata = np.zeros(len(self.features), dtype=np.int64)

    @classmethod
    def from_csv(cls, path: str | Path, task: str = "classification") -> TableBagDataset:
        """Read ``label,bag,f0,f1,...`` (``task="survival"``: ``time,event,bag,f0,...``), one row per instance;
        bags in order of first appearance. A survival bag's time must be >= 0, its event 0 or 1."""
        path = Path(path)
        if task not in ("classification", "survival"):
            raise ConfigError(f"task must be classification or survival, not {task!r}")
        lead = ("label",) if task == "classification" else ("time", "event")
        cols, bags, x, lines = _read_instance_table(path, lead)
        order: dict[str, list[int]] = {}
        for k, b in enumerate(bags):
            order.setdefault(b, []).append(k)
        per_bag: dict[str, tuple[str, ...]] = {}
        for b, idx in order.items():
            found = {tuple(c[k] for c in cols) for k in idx}
            if len(found) != 1:
                what = "labels" if len(lead) == 1 else "/".join(lead)
                values = sorted(v[0] if len(lead) == 1 else "/".join(v) for v in found)
                raise BagDataError(f"{path}: bag {b} has instances with different {what} {values}")
            per_bag[b] = found.pop()
        x32 = torch.from_numpy(x.astype(np.float32))
        features = [x32[idx] for idx in order.values()]
        if task == "classification":
            classes = sort_classes([v[0] for v in per_bag.values()])
            return cls(features, [classes.index(per_bag[b][0]) for b in order], list(order), classes)
        times, events = [], []
        for b, idx in order.items():
            raw_time, raw_event = per_bag[b]
            line = lines[idx[0]]
            try:
                t = float(raw_time)
            except ValueError:
                raise BagDataError(f"{path}:{line}: bag {b}: time {raw_time!r} is not a number") from None
            if not math.isfinite(t) or t < 0:
                raise BagDataError(f"{path}:{line}: bag {b}: time must be a finite number >= 0, not {raw_time}")
            if raw_event not in ("0", "1", "0.0", "1.0"):
                raise BagDataError(f"{path}:{line}: bag {b}: event must be 0 (censored) or 1, not {raw_event!r}")
            times.append(t)
            events.append(raw_event.startswith("1"))
        return cls(features, [int(e) for e in events], list(order), ["0", "1"], times=times, events=events)

    def subset(self, indices: Sequence[int] | np.ndarray) -> TableBagDataset:
        """The bags at ``indices`` as a new dataset (tensors shared, not copied)."""
        idx = [int(i) for i in indices]
        survival = hasattr(self, "times")
        return TableBagDataset([self.features[i] for i in idx], self.targets[idx], self.groups[idx], self.classes,
                               times=self.times[idx] if survival else None,
                               events=self.events[idx] if survival else None)

    def set_epoch(self, epoch: int) -> None:
        """No-op: table bags are used whole; present so training code treats both datasets alike."""

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, i: int) -> Bag:
        if hasattr(self, "times"):
            return Bag(features=self.features[i], target=int(self.targets[i]), slide_id=str(self.groups[i]),
                       time=float(self.times[i]), event=bool(self.events[i]))
        return Bag(features=self.features[i], target=int(self.targets[i]), slide_id=str(self.groups[i]), coords=None)


def _read_instance_table(path: Path, lead: tuple[str, ...]
                         ) -> tuple[list[list[str]], list[str], np.ndarray, list[int]]:
    """``(lead columns, bag ids, features (n, D) float64, line numbers)`` of a ``<lead...>,bag,f0,...`` CSV."""
    expected = [*lead, "bag"]
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.reader(fh)
            header = [h.strip() for h in next(reader, [])]
            if header[: len(expected)] != expected or len(header) <= len(expected):
                raise BagDataError(f"{path}: expected header {','.join(expected)},<features...>, "
                                   f"got {','.join(header[:4])}")
            rows, lines = [], []
            for r in reader:
                if r:
                    rows.append(r)
                    lines.append(reader.line_num)
    except (OSError, UnicodeDecodeError) as err:
        raise BagDataError(f"{path}: cannot read bag table ({err})") from err
    if not rows:
        raise BagDataError(f"{path}: no instances")
    width, skip = len(header), len(expected)
    for line, r in zip(lines, rows, strict=True):
        if len(r) != width:
            raise BagDataError(f"{path}:{line}: {len(r)} fields, header has {width}")
    cols = [[r[j].strip() for r in rows] for j in range(len(lead))]
    bags = [r[skip - 1].strip() for r in rows]
    try:
        x = np.array([r[skip:] for r in rows], dtype=np.float64)
    except ValueError:
        for line, r in zip(lines, rows, strict=True):  # error path only: find the row to name
            try:
                np.array(r[skip:], dtype=np.float64)
            except ValueError as err:
                raise BagDataError(f"{path}:{line}: bag {r[skip - 1].strip()}: non-numeric feature ({err})") from err
        raise
    bad_rows = np.flatnonzero(~np.isfinite(x).all(axis=1))
    if bad_rows.size:
        k = int(bad_rows[0])
        raise BagDataError(f"{path}:{lines[k]}: bag {bags[k]}: NaN/Inf feature value")
    return cols, bags, x, lines
