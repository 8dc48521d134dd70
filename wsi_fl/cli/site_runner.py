"""``wsi-fl site-runner``: the site's own task runner for a SuperNode started with ``--isolation process``.

::

    flower-supernode --isolation process --host 127.0.0.1 --port 9094 --superlink HOST:PORT ... \\
        --node-config "data-path='...' labels='...' site-name='site_1' policy='/etc/wsi-fl/policy.toml' ..."
    wsi-fl site-runner --runtime-api 127.0.0.1:9094

It runs in place of Flower's ``flower-superexec``: every ClientApp task's app
bundle is hashed and checked against the site policy's ``approved-apps``; an
approved release runs as the site-installed ClientApp (``wsi_fl.site.app``,
never the bundle's code), anything else is refused with a one-line reason at
the coordinator and a line in the site's audit log. ``wsi-fl app-hash DIR``
prints the hash of a reviewed release; docs/threat-model.md says why.
Runs until stopped: SIGTERM (a service manager's, or ``wsi-fl rehearse``'s
stop) is a normal end, exit 0 without a message; Ctrl-C exits 130.
"""

from __future__ import annotations

import argparse
import signal

from wsi_fl.cli._common import EXIT_OK


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("site-runner", help="run a SuperNode's tasks with the site's own app, approved releases only",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runtime-api", default="127.0.0.1:9094",
                   help="the SuperNode's Runtime API (its --host:--port) [%(default)s]")
    p.add_argument("--poll-interval", type=float, default=0.5, help="seconds between polls [%(default)s]")
    p.set_defaults(func=run)


class _Stopped(BaseException):
    """SIGTERM: the runner is told to stop (a BaseException, so that no ``except Exception`` on the way swallows it)."""


def _stop(signum: int, frame: object) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the clean-up short
    raise _Stopped


def run(args: argparse.Namespace) -> int:
    from wsi_fl._logging import configure_logging
    from wsi_fl.site.runner import serve

    configure_logging()
    # A runner is a service: being stopped is how it ends, not an interruption of work to report (wsi-fl's own
    # SIGTERM handler would print "interrupted" and exit 130). Its task processes are stopped with it.
    previous = signal.signal(signal.SIGTERM, _stop)
    try:
        serve(args.runtime_api, poll_interval=args.poll_interval)
    except _Stopped:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
    return EXIT_OK
