"""``wsi-fl labels init``: the labels file for the slides that have features, from a preprocessing manifest.

::

    wsi-fl labels init --manifest OUT/manifest.csv                      # OUT/labels.csv: a template to fill in
    wsi-fl labels init --manifest OUT/manifest.csv --from clinical.csv  # your outcome table's rows for them

Training, a federated site and evaluation need a label for every slide they are given and a feature file
with tiles for every labelled slide. A slide whose preprocessing ``failed`` has no feature file and one that
is ``empty`` has nothing to learn from, so both are left out here (and named). Without ``--from`` it writes
``slide_id,label,patient_id`` with the label and patient columns empty, for you to fill in; with ``--from``
it keeps the rows (all their columns) of your outcome table whose slide has features, and names the labelled
slides left out and the slides with features that have no label. An existing file is never replaced unless
``--force``. Standard library only.
"""

from __future__ import annotations

import argparse
import csv
import io
from pathlib import Path

from wsi_fl.cli._common import EXIT_OK, UsageError, existing_file

#: Manifest statuses of slides with a usable feature file (preprocessing.pipeline.USABLE).
USABLE = ("ok", "skipped")
TEMPLATE_COLUMNS = ("slide_id", "label", "patient_id")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("labels", help="write the labels file for the slides that have features",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    init = actions.add_parser("init", help="labels for the slides of a manifest that have features",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    init.add_argument("--manifest", type=existing_file, required=True, help="OUT/manifest.csv of wsi-fl preprocess")
    init.add_argument("--from", dest="source", type=existing_file, metavar="CSV",
                      help="your outcome table (slide_id, label, ...): keep its rows for the slides with features")
    init.add_argument("--out", type=Path, help="file to write (default: labels.csv beside the manifest)")
    init.add_argument("--force", action="store_true", help="replace an existing --out")
    p.set_defaults(func=run)


def _read_csv(path: Path, what: str) -> tuple[list[str], list[dict[str, str]]]:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as err:
        raise UsageError(f"{path}: cannot read {what} ({err})") from err
    reader = csv.DictReader(io.StringIO(text))
    columns = [c.strip() for c in reader.fieldnames or []]
    reader.fieldnames = columns
    rows = [{k: (v or "").strip() for k, v in row.items() if k is not None} for row in reader]
    return columns, [r for r in rows if any(r.values())]


def usable_slides(manifest: Path) -> tuple[list[str], dict[str, str]]:
    """(slide ids with features, in manifest order; {slide id: status} of the others)."""
    columns, rows = _read_csv(manifest, "the manifest")
    if not {"slide_id", "status", "n_tiles"} <= set(columns):
        raise UsageError(f"{manifest}: not a preprocessing manifest (header {','.join(columns)})")
    usable, other = [], {}
    for r in rows:
        tiles = r["n_tiles"]
        # an "ok" or "skipped" slide with 0 tiles: a manifest written before the "empty" status
        if r["status"] in USABLE and tiles.isdigit() and int(tiles) > 0:
            usable.append(r["slide_id"])
        else:
            other[r["slide_id"]] = "empty" if r["status"] in USABLE else r["status"]
    return usable, other


def _few(ids: list[str], k: int = 10) -> str:
    return " ".join(ids[:k]) + (f" ... ({len(ids)} in all)" if len(ids) > k else "") if ids else "none"


def run(args: argparse.Namespace) -> int:
    out = args.out or args.manifest.parent / "labels.csv"
    if out.exists() and not args.force:
        raise UsageError(f"{out} already exists (--force replaces it)")
    usable, other = usable_slides(args.manifest)
    if args.source is None:
        columns, rows = list(TEMPLATE_COLUMNS), [{"slide_id": s, "label": "", "patient_id": ""} for s in usable]
        message = [f"{len(rows)} slides with features -> {out}: fill in label (and patient_id: slides of one "
                   "patient are kept in one split)",
                   f"left out (no features): {_few(sorted(other))}"]
    else:
        columns, table = _read_csv(args.source, "the outcome table")
        if "slide_id" not in columns:
            raise UsageError(f"{args.source}: no slide_id column (header {','.join(columns)})")
        have = set(usable)
        rows = [r for r in table if r["slide_id"] in have]
        labelled = {r["slide_id"] for r in table}
        message = [f"{len(rows)} of {len(table)} labelled slides usable -> {out}",
                   f"left out (no usable features): {_few(sorted(labelled - have))}",
                   f"with features but no label: {_few([s for s in usable if s not in labelled])}"]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(buffer.getvalue(), encoding="utf-8")
    tmp.replace(out)
    print("\n".join(message))
    return EXIT_OK
