"""``wsi-fl check-policy``: validate a site policy file and print what it allows.

::

    wsi-fl check-policy /etc/wsi-fl/site-policy.toml

Reads the file as the site's ClientApp and task runner will (unknown keys,
wrong types and inconsistent values are one-line errors naming the file and
the key, exit 2) and prints every rule with its value, defaults included, one
per line, so a reviewer sees what the site will and will not do before the
SuperNode starts. docs/site-policy.md documents each key.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from wsi_fl.cli._common import EXIT_OK


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("check-policy", help="validate a site policy file and print what it allows",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("file", type=Path, help="the site policy (TOML)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from wsi_fl.site.policy import load_policy

    policy = load_policy(args.file)
    print(f"{args.file}: a valid site policy; it allows:")
    for rule in policy.describe().split("; "):
        print(f"  {rule}")
    return EXIT_OK
