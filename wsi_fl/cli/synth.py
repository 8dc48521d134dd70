"""``wsi-fl synth-cohort``: write a synthetic multi-site cohort of pyramidal TIFF slides."""

from __future__ import annotations

import argparse
from pathlib import Path

from wsi_fl.cli._common import EXIT_OK, UsageError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("synth-cohort", help="generate a synthetic multi-site cohort (slides + labels)",
                       description=__doc__)
    p.add_argument("--out", type=Path, required=True, help="output directory (one sub-directory per site)")
    p.add_argument("--sites", type=int, default=3, help="number of sites (default: 3)")
    p.add_argument("--slides-per-site", type=int, default=6, help="base number of slides per site (default: 6)")
    p.add_argument("--seed", type=int, default=0, help="random seed; same seed, same cohort (default: 0)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.sites < 1 or args.slides_per_site < 1:
        raise UsageError("--sites and --slides-per-site must be at least 1")
    from preprocessing.synth import generate_cohort

    sites = generate_cohort(args.out, sites=args.sites, slides_per_site=args.slides_per_site, seed=args.seed,
                            progress=not args.quiet)
    for s in sites:
        print(f"{s.site}: {s.n_slides} slides ({s.n_positive} positive), {s.n_patients} patients -> {s.slides_dir}")
    return EXIT_OK
