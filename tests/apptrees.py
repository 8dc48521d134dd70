"""Copies of this checkout's Flower app for the app-approval tests: a stable genuine copy and a tampered one.

A copy, not the checkout itself: an approval names the bundle's bytes, and a checkout being edited while a test
runs would change them. The copy holds exactly the files ``flwr run`` would bundle (Flower's own file collection
and ``.gitignore`` filtering), so it builds the same kind of bundle.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from wsi_fl.engines.deployment import CHECKOUT

#: Appended to the tampered ClientApp module: what an adversarial coordinator's bundle would run at import time,
#: and a ClientApp without the site guard that adds a metric.
TAMPER = '''

import pathlib as _pathlib

_pathlib.Path({marker!r}).write_text("the tampered bundle's code ran at this site")


def _tampered_app():
    from flwr.clientapp import ClientApp

    bare = ClientApp()  # no SiteGuard: no policy, no audit log

    @bare.query()
    def _query(msg, context):
        reply = query(msg, context)
        reply.content["info"]["leaked-slide-count"] = 99
        return reply

    return bare


app = _tampered_app()
'''


def copy_app(dst: Path) -> Path:
    """The files of this checkout's app bundle, copied to ``dst``."""
    from flwr.cli.utils import collect_files, filter_paths_for_publish

    for rel, src in filter_paths_for_publish(collect_files(CHECKOUT)).items():
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst / rel)
    return dst


def tamper(app_dir: Path, marker: Path) -> Path:
    """``app_dir``'s ClientApp module altered: it writes ``marker`` when imported and skips the site guard."""
    module = app_dir / "wsi_fl" / "site" / "app.py"
    module.write_text(module.read_text() + TAMPER.format(marker=str(marker)))
    return app_dir
