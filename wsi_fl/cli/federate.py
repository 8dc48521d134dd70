"""``wsi-fl federate``: federated training of a cohort's sites on this machine (Flower simulation engine).

``--cohort DIR`` holds one subdirectory per site with ``labels.csv`` and
``features/`` (what ``wsi-fl demo`` writes under ``demo-out/cohort``). Every
option below is a key of ``[tool.flwr.app.config]`` in ``pyproject.toml``;
the deployment engine (``flwr run .``) takes the same keys. ``--task survival``
trains survival models from ``time``/``event`` label columns (``--hist-time-max``,
the longest follow-up expected, is then required: it fixes the grid of the
count histograms from which the server computes the pooled C-index).
Written to ``--out``: ``best.pt`` and ``last.pt`` (``wsi-fl evaluate`` takes
them), ``metrics.jsonl``, ``metrics.png`` and ``state.pt`` (for ``--resume``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from wsi_fl.cli._args import add_dataclass_args, dataclass_from_args
from wsi_fl.cli._common import EXIT_OK
from wsi_fl.federation.config import FedConfig


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("federate", help="federated training of a cohort's sites in Flower's simulation engine",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cohort", type=Path, required=True, help="directory of sites (<site>/labels.csv, features/)")
    p.add_argument("--out", type=Path, required=True, help="output directory of the server")
    p.add_argument("--cpus-per-site", type=float, default=1.0, help="CPU cores reserved per simulated site")
    add_dataclass_args(p.add_argument_group("federation (run config)"), FedConfig, exclude=("out_dir",))
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # A bad run config (ConfigError), cohort (SiteConfigError) or federation (FederationError) is a project
    # error, reported in one line by wsi_fl.cli.main.
    cfg = dataclass_from_args(FedConfig, args, out_dir=str(args.out))
    import json

    from wsi_fl.engines.simulation import simulate

    result = simulate(args.cohort, cfg, cpus_per_site=args.cpus_per_site)
    last = result.history[-1] if result.history else {}
    print(f"federated {cfg.strategy}: {result.rounds_completed} rounds; best round {result.best_round}")
    keys = (("val-c-index", "val-loss", "test-c-index", "test-td-auc", "test-td-auc-time", "bytes-per-client")
            if cfg.task == "survival" else ("val-auc", "val-loss", "test-auc", "test-accuracy", "bytes-per-client"))
    print("last round:", json.dumps({k: last.get(k) for k in keys}))
    print(f"models: {args.out}/best.pt, {args.out}/last.pt; metrics: {args.out}/metrics.jsonl, metrics.png")
    return EXIT_OK
