"""Which of the given slides ``wsi-fl evaluate`` scores: by default only those the model was not trained on.

A site that evaluates a federated or pooled ``best.pt`` with its usual labels file would otherwise score its
own training slides too and report an AUC that is not a held-out AUC. Every checkpoint of this project records
how its training slides were split (:class:`~wsi_fl.mil.config.SplitRecord`: seed, fractions, label column,
rule), and a site's split depends only on its own labels and that record, so it can be recomputed here exactly
as training drew it (:func:`wsi_fl.mil.fit.assign_splits`; a federated site draws its split the same way,
:mod:`wsi_fl.site.data`). No slide id is needed, so none is kept in a federated checkpoint.

* ``test`` (the default) and ``val`` score that split of the recomputed one;
* ``all`` scores every slide given, and the report says that it may include slides the model was trained on.

A checkpoint from before split records cannot tell its training slides apart: then only labels whose ``split``
column is filled on every row (the split such a training used) or ``all`` are accepted.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from wsi_fl.errors import ConfigError
from wsi_fl.evaluation.options import SPLIT_CHOICES
from wsi_fl.mil.config import SPLIT_RULE, SplitRecord
from wsi_fl.mil.data import BagRecord
from wsi_fl.mil.splits import assign_splits, labels_digest, splits_from_column

ALL_WARNING = "scores every slide given, including any the model was trained on: not a held-out estimate"


@dataclass(frozen=True)
class Selection:
    """The slides to score and how they were chosen (written to ``metrics.json`` as ``evaluated``)."""

    split: str
    records: list[BagRecord]
    n_given: int
    how: str
    notes: list[str] = field(default_factory=list)

    @property
    def held_out(self) -> bool:
        return self.split != "all"

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"split": self.split, "held_out": self.held_out, "slides_given": self.n_given,
                               "slides_scored": len(self.records),
                               "slides_left_out": self.n_given - len(self.records), "how": self.how}
        if not self.held_out:
            out["warning"] = ALL_WARNING
        if self.notes:
            out["notes"] = list(self.notes)
        return out

    def line(self) -> str:
        """One line for the terminal: what was scored, and what was left out."""
        if not self.held_out:
            return f"scored ALL {self.n_given} slides given (--split all): {ALL_WARNING}"
        return (f"scored the {self.split} split: {len(self.records)} of {self.n_given} slides "
                f"({self.n_given - len(self.records)} left out: {self.how})")


def _no_record(records: Sequence[BagRecord], split: str, checkpoint: str) -> Selection:
    by_column = splits_from_column(records)
    if by_column is None:
        raise ConfigError(f"{checkpoint} does not record how its training slides were split (it predates split "
                          "records), so the slides it trained on cannot be told apart: give labels whose split "
                          "column is filled on every row, or --split all to score every slide, including any it "
                          "was trained on")
    chosen = by_column.get(split)
    if chosen is None or len(chosen) == 0:
        raise ConfigError(f"no slide of the labels has split={split} (the checkpoint records no split of its own)")
    return Selection(split, [records[int(i)] for i in chosen], len(records),
                     f"the other splits of the labels' split column; {checkpoint} records no split of its own")


def select_slides(meta: Mapping[str, Any], records: Sequence[BagRecord], split: str | None,
                  checkpoint: str = "the checkpoint") -> Selection:
    """The records to score under ``split`` (``None``: ``test``) for a checkpoint with ``meta``; see the module doc.

    Raises :class:`ConfigError` (one line) when the held-out slides cannot be known: no record and no complete
    split column, an unknown rule, a split the record does not have, or too few patients to redraw it.
    """
    split = split or "test"
    if split not in SPLIT_CHOICES:
        raise ConfigError(f"--split must be one of {', '.join(SPLIT_CHOICES)}, not {split!r}")
    records = list(records)
    if split == "all":
        return Selection("all", records, len(records), "none: --split all")
    record = SplitRecord.from_meta(dict(meta))
    if record is None:
        return _no_record(records, split, checkpoint)
    if record.rule != SPLIT_RULE:
        raise ConfigError(f"{checkpoint} was split by a rule this version does not know ({record.rule!r}): "
                          "evaluate with the version that trained it, or --split all")
    notes = []
    digest = labels_digest(records)
    trained = [s["name"] for s in record.sites if s.get("labels_digest") == digest]
    if trained:
        notes.append(f"the labels are training site {trained[0]}'s, unchanged")
    elif record.sites:
        names = ", ".join(str(s.get("name")) for s in record.sites)
        notes.append(f"the labels are not those any training site ({names}) trained with: if this is another "
                     "cohort, --split all scores all of it; if a training site's labels changed since, the "
                     "recomputed split may differ from the one trained on")
    else:
        notes.append("a federated checkpoint cannot tell whether this site took part: its split is redrawn as a "
                     "federated site draws it (for a cohort that took no part, --split all scores all of it)")
    try:
        splits = assign_splits(records, record.val_frac, record.test_frac, record.seed)
    except ConfigError as err:
        raise ConfigError(f"cannot redraw the training split of these labels ({err}); --split all scores every "
                          "slide, including any the model was trained on") from err
    chosen = splits.get(split)
    if chosen is None or len(chosen) == 0:
        raise ConfigError(f"the model's training left no {split} split ({record.describe()}): its sites' slides "
                          "were all used to train or select it; --split all scores them anyway")
    if split == "val":
        notes.append("the val split chose the model's epoch or round: not trained on, but selected on")
    if splits_from_column(records) is not None:
        how = "the other splits of the labels' split column, as training used it"
    else:
        how = f"the training split redrawn from the checkpoint's record ({record.describe()})"
    return Selection(split, [records[int(i)] for i in chosen], len(records), how, notes)
