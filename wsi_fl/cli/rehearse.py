"""``wsi-fl rehearse``: the app as a real Flower deployment on this machine (one SuperLink, one SuperNode per
site, ``flwr run``), on loopback.

::

    wsi-fl rehearse --cohort demo-out/cohort --rounds 5 --out runs/local

Unlike ``wsi-fl federate`` (Flower's simulation engine, one process), every
part runs as in a hospital deployment: separate SuperLink and SuperNode
processes, the app shipped as a FAB built from ``--app``'s ``pyproject.toml``,
each site's data found only through its SuperNode's node config, the run
config parsed by ``flwr run``. What breaks in deployment breaks here first.

TLS and SuperNode authentication are on by default (certificates and keys
written to ``--workdir``); ``--insecure`` runs plain HTTP, loopback only.
``--kill-site SITE`` kills that site's SuperNode after ``--kill-after-round``
rounds (a hospital dropping out); ``--unregistered-site SITE`` also starts an
impostor SuperNode the SuperLink must refuse; ``--site-image`` and
``--server-image`` run the SuperNodes and the SuperLink in containers.
Each site runs only app releases it approved: its SuperNode runs with
``--isolation process`` and a ``wsi-fl site-runner`` that checks each run's
bundle hash against the site policy's ``approved-apps`` (the genuine app's,
or ``--approve``); an ``--app`` the sites did not approve is refused.
Every process started is stopped again, also on errors, Ctrl-C and SIGTERM.
Exit code 0 when the run completed every round (and an impostor was refused),
1 when it did not (log tails on stderr), 2 for bad options.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from wsi_fl.cli._common import EXIT_FAILED, EXIT_OK, UsageError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("rehearse", help="run a real Flower deployment (SuperLink, SuperNodes, flwr run) on loopback",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cohort", type=Path, default=Path("demo-out") / "cohort",
                   help="one subdirectory per site, each with labels.csv and features/ [%(default)s]")
    p.add_argument("--out", type=Path, required=True, help="the run's out-dir: checkpoints and metrics")
    p.add_argument("--rounds", type=int, default=3, help="num-server-rounds [%(default)s]")
    p.add_argument("--seed", type=int, default=0, help="the run's seed [%(default)s]")
    p.add_argument("--run-config", default=None,
                   help="more run config: \"local-epochs=2 strategy='fedprox'\" or a .toml file")
    p.add_argument("--workdir", type=Path, default=None, help="logs and FLWR_HOME [a new temporary directory]")
    p.add_argument("--app", type=Path, default=None,
                   help="the Flower app directory (with pyproject.toml) the FAB is built from "
                        "[this checkout, or $WSI_FL_APP]")
    p.add_argument("--approve", nargs="+", default=None, metavar="DIR_OR_HASH",
                   help="app directories or sha256:... hashes the sites approve (an --app not among them is "
                        "refused at every site) [the genuine app: this checkout, or $WSI_FL_APP]")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds the run may take [%(default)s]")
    p.add_argument("--kill-site", default=None,
                   help="rehearse a dropout: SIGKILL this site's SuperNode mid-run (see --kill-after-round)")
    p.add_argument("--kill-after-round", type=int, default=1, help="rounds completed before the kill [%(default)s]")
    p.add_argument("--insecure", action="store_true",
                   help="plain HTTP without TLS or SuperNode authentication (loopback only) [TLS and auth on]")
    p.add_argument("--unregistered-site", default=None,
                   help="also start a SuperNode for this site with an unregistered key; the SuperLink must refuse it")
    p.add_argument("--policy", type=Path, default=None,
                   help="site policy file for every SuperNode; it must allow this SuperLink [a rehearsal policy]")
    p.add_argument("--site-image", default=None,
                   help="run the SuperNodes in this image (e.g. localhost/wsi-fl-site:latest) [this environment]")
    p.add_argument("--server-image", default=None,
                   help="run the SuperLink in this image (e.g. localhost/wsi-fl-server:latest) [this environment]")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import sys

    from wsi_fl.engines.deployment import LocalFederationError, failure_logs, rehearse, summary

    try:
        result = rehearse(args.cohort, args.out, args.rounds, seed=args.seed, run_config=args.run_config,
                          workdir=args.workdir, app=args.app, timeout=args.timeout, kill_site=args.kill_site,
                          kill_after_round=args.kill_after_round, insecure=args.insecure,
                          unregistered_site=args.unregistered_site, policy=args.policy,
                          site_image=args.site_image, server_image=args.server_image, approve=args.approve)
    except LocalFederationError as err:  # a process died or the run timed out: the message has the log tails
        print(f"FAILED: {err}", file=sys.stderr)
        return EXIT_FAILED
    except (ValueError, FileNotFoundError) as err:  # bad options or inputs, found before any process started
        raise UsageError(str(err)) from err
    if not result["ok"]:
        print(failure_logs(result), file=sys.stderr)
    print(summary(result))
    return EXIT_OK if result["ok"] else EXIT_FAILED
