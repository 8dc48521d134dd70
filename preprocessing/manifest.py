"""The record of a batch: its slides, their tasks and results, output paths, and the manifests shards write
and merge.

Split from :mod:`.pipeline` (which runs the batch); everything here is re-exported there,
where callers have always imported it.
"""

from __future__ import annotations

import csv
import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from .atomic import write_csv_atomic
from .errors import InputError
from .slide import slide_id_for

MANIFEST_FIELDS = ("slide_id", "status", "n_tiles", "seconds", "error", "source")
#: File suffixes picked up when a directory is given (OpenSlide's formats and plain TIFF).
SLIDE_SUFFIXES = frozenset(
    {".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".bif", ".svslide", ".dcm"}
)

Status = Literal["ok", "skipped", "empty", "failed"]
#: Statuses of slides whose feature file has tiles: what training and ``wsi-fl labels init`` use.
USABLE = ("ok", "skipped")


@dataclass(frozen=True)
class SlideTask:
    slide_id: str
    path: Path


@dataclass
class SlideResult:
    slide_id: str
    status: Status
    n_tiles: int
    seconds: float
    error: str
    source: str


def features_path(out_dir: Path, slide_id: str) -> Path:
    return Path(out_dir) / "features" / f"{slide_id}.h5"


def qc_path(out_dir: Path, slide_id: str) -> Path:
    return Path(out_dir) / "qc" / f"{slide_id}.png"


def discover_slides(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Files as given; directories searched recursively for :data:`SLIDE_SUFFIXES`.

    A DICOM slide is a directory of ``.dcm`` files that OpenSlide opens from any
    one of them (and is named after it: :func:`~.slide.slide_id_for`), so a
    directory contributes only its first ``.dcm`` file, whether found or given.
    """
    found: list[Path] = []
    dicom_dirs: set[Path] = set()

    def add(f: Path) -> None:
        if f.suffix.lower() == ".dcm":
            if f.absolute().parent in dicom_dirs:
                return
            dicom_dirs.add(f.absolute().parent)
        found.append(f)

    for p in map(Path, paths):
        if not p.is_dir():
            add(p)
            continue
        for f in sorted(p.rglob("*")):
            if f.is_file() and f.suffix.lower() in SLIDE_SUFFIXES and not f.name.startswith("."):
                add(f)
    return found


def plan_tasks(slides: Sequence[Path], shard: tuple[int, int] | None = None) -> list[SlideTask]:
    """Slide ids, sorted, checked unique, then this shard's share (every n-th from i)."""
    tasks = sorted((SlideTask(slide_id_for(p), Path(p)) for p in slides), key=lambda t: (t.slide_id, str(t.path)))
    seen: dict[str, Path] = {}
    for t in tasks:
        if t.slide_id in seen:
            raise InputError(f"two slides share the id {t.slide_id!r}: {seen[t.slide_id]} and {t.path}")
        seen[t.slide_id] = t.path
    if shard is not None:
        i, n = shard
        tasks = tasks[i::n]
    return tasks


def manifest_path(out_dir: Path, shard: tuple[int, int] | None) -> Path:
    """``manifest.csv``; each shard of a job array writes its own, so they never overwrite each other."""
    if shard is None or shard[1] == 1:
        return Path(out_dir) / "manifest.csv"
    return Path(out_dir) / f"manifest.shard-{shard[0]}-of-{shard[1]}.csv"


def write_manifest(path: Path, results: Sequence[SlideResult]) -> None:
    rows = [asdict(r) | {"seconds": f"{r.seconds:.2f}"} for r in results]
    write_csv_atomic(path, MANIFEST_FIELDS, ([row[k] for k in MANIFEST_FIELDS] for row in rows))


_SHARD_MANIFEST = re.compile(r"manifest\.shard-(\d+)-of-(\d+)\.csv")


def _few(items: Sequence[str], k: int = 3) -> str:
    return ", ".join(items[:k]) + (" ..." if len(items) > k else "")


def read_manifest(path: str | os.PathLike) -> list[dict[str, str]]:
    """The rows of a manifest written by :func:`write_manifest` (all values as text)."""
    with Path(path).open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if tuple(reader.fieldnames or ()) != MANIFEST_FIELDS:
            raise InputError(f"{path}: not a preprocessing manifest (header {','.join(reader.fieldnames or [])})")
        return list(reader)


def merge_manifests(out_dir: str | os.PathLike, slides: Sequence[Path] | None = None) -> Path:
    """Join the shard manifests of a finished job array into ``OUT/manifest.csv`` (atomically); returns its path.

    Rows are sorted by slide id, as an unsharded run writes them. Raises
    ValueError (one line) when there is no shard manifest, when manifests of
    arrays with different shard counts are mixed (one left by an earlier run),
    when a shard's manifest is missing or a slide appears twice, and, if
    ``slides`` is given, when any of its slides has no row (a task that did not
    finish) or a row names a slide not among them.
    """
    out_dir = Path(out_dir)
    by_count: dict[int, dict[int, Path]] = {}
    for p in sorted(out_dir.glob("manifest.shard-*-of-*.csv")):
        if m := _SHARD_MANIFEST.fullmatch(p.name):
            by_count.setdefault(int(m[2]), {})[int(m[1])] = p
    if not by_count:
        raise InputError(f"no shard manifests (manifest.shard-I-of-N.csv) in {out_dir}"
                         " (a run of one shard writes manifest.csv itself)")
    if len(by_count) > 1:
        kinds = ", ".join(f"{len(found)} of n={n}" for n, found in sorted(by_count.items()))
        raise InputError(f"shard manifests of job arrays with different shard counts in {out_dir} ({kinds}):"
                         " remove those of the older run")
    ((n, found),) = by_count.items()
    missing = [manifest_path(out_dir, (i, n)).name for i in range(n) if i not in found]
    if missing or max(found) >= n:
        what = f"missing {_few(missing)}" if missing else f"index {max(found)} out of range"
        raise InputError(f"{len(found)} of {n} shard manifests in {out_dir} ({what}): did every array task run?")
    rows: dict[str, dict[str, str]] = {}
    origin: dict[str, str] = {}
    for i in range(n):
        for row in read_manifest(found[i]):
            sid = row["slide_id"]
            if sid in rows:
                raise InputError(f"slide {sid!r} is in both {origin[sid]} and {found[i].name}")
            rows[sid], origin[sid] = row, found[i].name
    if slides is not None:
        expected = {t.slide_id for t in plan_tasks(slides)}
        lacking, unknown = sorted(expected - rows.keys()), sorted(rows.keys() - expected)
        problems = [f"{len(lacking)} slide(s) with no row ({_few(lacking)}): a task did not finish; resubmit it"
                    " (finished slides are skipped)"] if lacking else []
        if unknown:
            problems.append(f"{len(unknown)} row(s) for slides not given ({_few(unknown)})")
        if problems:
            raise InputError(f"shard manifests in {out_dir} do not match the slides: {'; '.join(problems)}")
    merged = [rows[sid] for sid in sorted(rows)]
    path = out_dir / "manifest.csv"
    return write_csv_atomic(path, MANIFEST_FIELDS, ([row[k] for k in MANIFEST_FIELDS] for row in merged))


def no_tiles_reason(dims: tuple[int, int], tile_level0: float) -> str:
    if min(dims) < tile_level0:
        return f"no tiles: slide {dims[0]}x{dims[1]} px is smaller than one tile ({tile_level0:.0f} px at level 0)"
    return "no tiles: no tile reaches the minimum tissue fraction (see the QC image)"


def empty_reason(dims: tuple[int, int], tile_level0: float, attrs: Mapping[str, object]) -> str:
    """Why a slide has no tile: too small, no tissue, or every tile excluded by QC."""
    counts = json.loads(str(attrs.get("qc_excluded") or "{}"))
    if sum(counts.values()):
        what = ", ".join(f"{n} {k}" for k, n in counts.items() if n)
        return f"no tiles: every tile was excluded by per-tile QC ({what}; see the QC image)"
    return no_tiles_reason(dims, tile_level0)
