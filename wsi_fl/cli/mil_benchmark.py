"""``wsi-fl mil-benchmark``: repeated stratified k-fold CV on a MIL bag table; prints one JSON object."""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("mil-benchmark", help="k-fold CV of a MIL model on a bag-table CSV (label,bag,f0,...)",
                       description=__doc__)
    p.add_argument("--csv", type=Path, required=True, help="bag table: header label,bag,0,1,...")
    p.add_argument("--folds", type=int, default=10)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--model", default="gated_attention", help="registered MIL model name")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--per-fold", action="store_true", help="include every fold's values in the JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from models import list_models
    from wsi_fl.benchmarks.mil import BenchmarkConfig, run_mil_benchmark
    from wsi_fl.cli.main import UsageError

    if args.model not in list_models():
        raise UsageError(f"unknown model {args.model!r}; registered: {', '.join(list_models())}")
    cfg = replace(BenchmarkConfig(), folds=args.folds, repeats=args.repeats, model=args.model, seed=args.seed)
    try:
        result = run_mil_benchmark(args.csv, cfg, progress=not args.quiet)
    except ValueError as err:
        raise UsageError(str(err)) from err
    if not args.per_fold:
        result.pop("per_fold")
    print(json.dumps(result))
    return 0
