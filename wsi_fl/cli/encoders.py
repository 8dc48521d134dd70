"""``wsi-fl encoders``: the patch encoders this tool knows (model cards), and whose weights are installed here.

One row per card: name, feature dimension, the tile size and µm/px it was
trained at (``wsi-fl preprocess`` uses them unless told otherwise), licence and
whether it allows commercial use or needs an approved access request, and
where its weights were found on this machine (or ``-``). Weights are looked up
as ``wsi-fl preprocess`` does: ``--weights-dir`` or ``$WSI_FL_WEIGHTS_DIR``
(``weights.json``, ``<dir>/<encoder>/<file>``, a hub cache layout), then the
model hub's and torch's local caches. Nothing is downloaded or imported: the
check is file look-ups only, so it answers at once.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from wsi_fl.cli._common import EXIT_OK


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("encoders", help="list the patch encoders, their licences and installed weights",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights-dir", type=Path, metavar="DIR",
                   help="the site's weights catalogue (default: $WSI_FL_WEIGHTS_DIR)")
    p.add_argument("--json", action="store_true", help="print a JSON list, one object per encoder")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from preprocessing.cards import list_cards
    from preprocessing.weights import catalogue_description, find_local

    rows = []
    for card in list_cards():
        found = find_local(card, args.weights_dir)
        rows.append({
            "name": card.name, "title": card.title, "dim": card.dim, "tile_size": card.tile_size, "mpp": card.mpp,
            "input_size": card.input_size, "licence": card.licence, "commercial": card.commercial,
            "gated": card.gated, "use": card.licence_flag, "repo_id": card.repo_id,
            "weight_files": list(card.weight_files), "params_m": card.params_m,
            "weights": str(found.path) if found else None, "found_in": found.source if found else None,
        })
    if args.json:
        print(json.dumps(rows, indent=1))
        return EXIT_OK
    table = [("encoder", "dim", "tile", "licence", "use", "weights")]
    table += [(r["name"], str(r["dim"]), f"{r['tile_size']} px @ {r['mpp']:g} µm/px", r["licence"], r["use"],
               f"{r['weights']} ({r['found_in']})" if r["weights"] else "-") for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]) - 1)]
    for row in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=False)) + "  " + row[-1])
    installed = sum(bool(r["weights"]) for r in rows)
    print(f"\n{installed} of {len(rows)} encoders have weights here; {catalogue_description(args.weights_dir)}."
          " Install: copy a release's files to DIR/<encoder>/ (see docs/hospital-runbook.md); check the"
          " licence ('non-commercial', 'gated') before use.")
    return EXIT_OK
