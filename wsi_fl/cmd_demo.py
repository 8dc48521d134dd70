"""``wsi-fl demo``: the README's main job (synthetic cohort -> per-site preprocessing -> summary + QC)."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run the main job on a synthetic three-site cohort", description=__doc__)
    p.add_argument("--out", type=Path, default=Path("demo-out"), help="output directory (default: demo-out)")
    p.add_argument("--sites", type=int, default=3)
    p.add_argument("--slides-per-site", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from .cli import EXIT_FAILED, EXIT_OK
    from .demo import format_reports, run_demo

    reports = run_demo(args.out, sites=args.sites, slides_per_site=args.slides_per_site, seed=args.seed,
                       progress=not args.quiet)
    print(format_reports(reports))
    print(f"QC images: {args.out}/preprocessed/<site>/qc/*.png")
    return EXIT_FAILED if any(r.failed for r in reports) else EXIT_OK
