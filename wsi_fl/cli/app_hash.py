"""``wsi-fl app-hash``: the name of an app release as a site's policy approves it.

::

    wsi-fl app-hash path/to/reviewed/wsi-fl      # prints sha256:<64 hex>

Builds the Flower App Bundle from the source tree exactly as ``flwr run DIR``
and ``flwr build`` do (Flower's own builder: sorted files, fixed timestamps,
so the same tree always gives the same bytes) and prints the sha256 of its
bytes, which is what the site's task runner computes from every bundle it
receives. A hospital reviews a release, runs this on that tree, and adds the
line to ``approved-apps`` in its site policy (docs/hospital-runbook.md).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from wsi_fl.cli._common import EXIT_OK


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("app-hash", help="print the sha256 of the app bundle flwr run would build from a directory",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("directory", type=Path, nargs="?", default=Path("."),
                   help="the app's source tree (with pyproject.toml) [the current directory]")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from wsi_fl.site.approval import app_hash

    print(app_hash(args.directory))
    return EXIT_OK
