"""``wsi-fl synth-cohort``: write a synthetic multi-site cohort of pyramidal TIFF slides.

``--preset default`` is the quick, clean cohort (a clear signal every model finds); ``--preset realistic``
is what multi-hospital pathology looks like to a model (a weak signal, unequal centres, scanner
differences, artefacts, a colour shortcut at the small site 3): the cohort of ``wsi-fl demo``.
``--task survival`` also draws each patient's follow-up time and event (``labels.csv`` gains ``time,event``;
the hazard rises with responder status and the planted tumour area, censoring is independent of both).
``--shortcut-site K --shortcut-strength S`` sets (or, with 0, removes) the site-specific colour
shortcut on either preset: responders of site K stained S × darker, a cue a model of that site alone
learns and that does not transfer.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from wsi_fl.cli._common import EXIT_OK, UsageError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("synth-cohort", help="generate a synthetic multi-site cohort (slides + labels)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="output directory (one sub-directory per site)")
    p.add_argument("--sites", type=int, default=3, help="number of sites (default: 3)")
    p.add_argument("--slides-per-site", type=int, default=6, help="base number of slides per site (default: 6)")
    p.add_argument("--seed", type=int, default=0, help="random seed; same seed, same cohort (default: 0)")
    p.add_argument("--preset", choices=("default", "realistic"), default="default",
                   help="default: clean slides, clear signal; realistic: the demo's cohort (default: default)")
    p.add_argument("--shortcut-site", type=int, default=None,
                   help="site (1..K) whose responders carry a colour cue; 0: none (default: the preset's)")
    p.add_argument("--shortcut-strength", type=float, default=None,
                   help="darker staining of that site's responders, 0..1 (default: the preset's, else 0.3)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--task", choices=("classification", "survival"), default="classification",
                   help="survival: labels.csv also gets time,event (hazard rising with the planted tumour burden, "
                        "independent censoring; preprocessing._synth_survival)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.sites < 1 or args.slides_per_site < 1:
        raise UsageError("--sites and --slides-per-site must be at least 1")
    if args.shortcut_site is not None and not 0 <= args.shortcut_site <= args.sites:
        raise UsageError(f"--shortcut-site must be 0 (none) or a site number 1..{args.sites}, not {args.shortcut_site}")
    from dataclasses import replace

    from preprocessing.synth import generate_cohort, preset

    config = preset(args.preset)
    if args.shortcut_site is not None:
        strength = config.shortcut_strength or 0.3
        config = replace(config, shortcut_site=args.shortcut_site, shortcut_strength=strength)
    if args.shortcut_strength is not None:
        if not config.shortcut_site:
            raise UsageError(f"--shortcut-strength needs --shortcut-site (preset {args.preset!r} has no shortcut)")
        config = replace(config, shortcut_strength=args.shortcut_strength)
    sites = generate_cohort(args.out, sites=args.sites, slides_per_site=args.slides_per_site, seed=args.seed,
                            config=config, progress=not args.quiet, task=args.task)
    for s in sites:
        print(f"{s.site}: {s.n_slides} slides ({s.n_positive} positive), {s.n_patients} patients -> {s.slides_dir}")
    if config.shortcut_site and config.shortcut_strength:
        print(f"shortcut: responders of site_{config.shortcut_site} stained {config.shortcut_strength:.2f} darker")
    return EXIT_OK
