"""Survival label tables: ``slide_id,<time>,<event>[,...]`` checked row by row, one-line errors.

Standard library only, so the command line can validate a table before anything heavy is imported. The column
names are settable (``time`` and ``event`` by default). A time must be a finite number >= 0 (any unit, the same
for every row); an event must be 1 (the event was observed) or 0 (censored at that time). What is wrong is
reported as ``path:line: ...``, the way :func:`wsi_fl.mil.data.read_labels` reports classification labels.
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

from wsi_fl.errors import ConfigError

__all__ = ["SurvivalLabelError", "read_survival_labels", "read_survival_records"]

_EVENT_VALUES = {"0": False, "1": True, "0.0": False, "1.0": True}


class SurvivalLabelError(ConfigError):
    """A survival label table that cannot be used: missing column, bad time or event (one line)."""


def read_survival_labels(path: str | Path, *, time_col: str = "time", event_col: str = "event",
                         id_col: str = "slide_id") -> dict[str, tuple[float, bool]]:
    """``{slide_id: (time, event)}`` from a CSV table; other columns are ignored."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as err:
        raise SurvivalLabelError(f"{path}: cannot read survival label file ({err})") from err
    reader = csv.DictReader(io.StringIO(text))
    header = [h.strip() for h in reader.fieldnames or []]
    if not header:
        raise SurvivalLabelError(f"{path}: empty label file (expected a header {id_col},{time_col},{event_col})")
    reader.fieldnames = header
    missing = [c for c in (id_col, time_col, event_col) if c not in header]
    if missing:
        raise SurvivalLabelError(f"{path}: missing column(s) {', '.join(missing)} (header: {','.join(header)})")
    out: dict[str, tuple[float, bool]] = {}
    for row in reader:
        line = reader.line_num
        cells = {k: (v or "").strip() for k, v in row.items() if k is not None}
        if not any(cells.values()):
            continue
        slide, raw_time, raw_event = cells[id_col], cells[time_col], cells[event_col]
        if not slide:
            raise SurvivalLabelError(f"{path}:{line}: empty {id_col}")
        if slide in out:
            raise SurvivalLabelError(f"{path}:{line}: duplicate {id_col} {slide}")
        try:
            t = float(raw_time)
        except ValueError:
            raise SurvivalLabelError(f"{path}:{line}: slide {slide}: {time_col} {raw_time!r} is not a number") from None
        if not math.isfinite(t) or t < 0:
            raise SurvivalLabelError(f"{path}:{line}: slide {slide}: {time_col} must be a finite number >= 0, "
                                     f"not {raw_time}")
        if raw_event not in _EVENT_VALUES:
            raise SurvivalLabelError(f"{path}:{line}: slide {slide}: {event_col} must be 0 (censored) or 1 (event), "
                                     f"not {raw_event!r}")
        out[slide] = (t, _EVENT_VALUES[raw_event])
    if not out:
        raise SurvivalLabelError(f"{path}: no rows")
    return out


def read_survival_records(path: str | Path, *, time_col: str = "time", event_col: str = "event") -> list:
    """The survival labels as :class:`wsi_fl.mil.data.BagRecord` s (patient and split columns as for
    classification), with ``time``/``event`` set and the event as label ("0"/"1") and target (0/1), so that
    patient-level splits are stratified by event status. Checks :func:`read_survival_labels` first, so a bad
    time or event is reported as such."""
    from dataclasses import replace

    from wsi_fl.mil.data import read_labels  # torch: imported on use (this module stays standard library only)

    outcomes = read_survival_labels(path, time_col=time_col, event_col=event_col)
    table = read_labels(path, label_col=event_col)  # patient_id, split; the events were checked just above
    return [replace(rec, label=str(int(outcomes[rec.slide_id][1])), target=int(outcomes[rec.slide_id][1]),
                    time=outcomes[rec.slide_id][0], event=outcomes[rec.slide_id][1]) for rec in table.records]
