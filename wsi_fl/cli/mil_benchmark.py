"""``wsi-fl mil-benchmark``: repeated stratified k-fold CV on a MIL bag table; prints one JSON object.

``--tune`` chooses learning rate, weight decay, embedding width and epochs per outer fold by nested CV on
that fold's training bags only (grid: ``wsi_fl.mil.tuning.TuneGrid``; about 12x the untuned run's CPU time).
``--task survival`` reads ``time,event,bag,0,1,...`` and reports Harrell's C-index (``c_index_mean``/``_std``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from wsi_fl.benchmarks.mil_config import BenchmarkConfig
from wsi_fl.cli._args import add_dataclass_args, dataclass_from_args
from wsi_fl.cli._common import EXIT_OK, UsageError

#: The protocol's fixed choices (not options): one configuration for every dataset. ``tune`` is the --tune flag
#: added below (a store_true option; the dataclass field reads it by name).
FIXED = ("val_frac", "train", "threads", "mil", "tune")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("mil-benchmark", help="k-fold CV of a MIL model on a bag-table CSV (label,bag,f0,...)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--csv", type=Path, required=True,
                   help="bag table: header label,bag,0,1,... (survival: time,event,bag,0,1,...)")
    add_dataclass_args(p, BenchmarkConfig, exclude=FIXED)
    p.add_argument("--tune", action="store_true",
                   help="nested CV per outer fold over a small grid (lr, weight decay, width, epochs) on the "
                        "training bags only, instead of the fixed settings")
    p.add_argument("--per-fold", action="store_true", help="include every fold's values in the JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    cfg = dataclass_from_args(BenchmarkConfig, args, exclude=FIXED, tune=args.tune)
    import json

    from models import list_models
    from wsi_fl.benchmarks.mil import run_mil_benchmark

    if cfg.model not in list_models():
        raise UsageError(f"unknown model {cfg.model!r}; registered: {', '.join(list_models())}")
    result = run_mil_benchmark(args.csv, cfg, progress=not args.quiet)  # a bad bag table: BagDataError
    if not args.per_fold:
        result.pop("per_fold")
    print(json.dumps(result))
    return EXIT_OK
