"""``wsi-fl demo``: the README's main job (synthetic cohort -> per-site preprocessing -> federated, pooled and
local MIL models, compared on the same held-out slides with 95 % CIs -> each site left out in turn and scored
by models of the other sites)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from wsi_fl.cli._common import EXIT_FAILED, EXIT_OK, UsageError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run the main job on a synthetic three-site cohort", description=__doc__)
    p.add_argument("--out", type=Path, default=Path("demo-out"), help="output directory (default: demo-out)")
    p.add_argument("--preset", choices=("realistic", "default"), default="realistic",
                   help="synthetic cohort: realistic (weak signal, unequal sites, a shortcut at one site) or "
                        "default (clean, every model scores ~1.0) (default: realistic)")
    p.add_argument("--sites", type=int, default=3)
    p.add_argument("--slides-per-site", type=int, default=None,
                   help="base slides per site (default: 32 for realistic, 6 for default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stain", choices=("none", "macenko", "reinhard"), default="none",
                   help="stain normalisation of the tiles before the encoder (default: none)")
    p.add_argument("--no-train", action="store_true", help="stop after preprocessing")
    p.add_argument("--no-federation", action="store_true", help="train the pooled model only")
    p.add_argument("--no-unseen", action="store_true", help="skip the leave-one-site-out (unseen site) models")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.sites < 2 or (args.slides_per_site is not None and args.slides_per_site < 1):
        raise UsageError("demo needs --sites >= 2 and --slides-per-site >= 1")
    from wsi_fl.demo import (
        Timer,
        compare_demo_models,
        format_reports,
        format_unseen,
        run_demo,
        train_demo_model,
        unseen_demo,
    )
    from wsi_fl.evaluation.compare import format_table, plot_comparison

    started = time.perf_counter()
    timer = Timer()
    progress = not args.quiet
    options = {}
    if args.stain != "none":
        from preprocessing.params import StainParams

        options["stain"] = StainParams(method=args.stain)
    reports = run_demo(args.out, sites=args.sites, slides_per_site=args.slides_per_site, seed=args.seed,
                       preset=args.preset, progress=progress, timer=timer, preprocess_options=options)
    print(format_reports(reports))
    print(f"QC images: {args.out}/cohort/<site>/qc/*.png")
    if any(r.failed for r in reports):
        return EXIT_FAILED
    if not args.no_train:
        result = train_demo_model(args.out, reports, seed=args.seed, progress=progress, timer=timer)
        m = result.test_metrics or {}
        ci = m.get("auc_ci95") or [float("nan")] * 2
        print(f"pooled gated-attention MIL: splits {result.split_sizes}, {result.best_epoch + 1} epochs")
        print(f"held-out test: n={m.get('n')} AUC={m.get('auc'):.3f} (95% CI {ci[0]:.2f}-{ci[1]:.2f})"
              f" accuracy={m.get('accuracy'):.2f} balanced accuracy={m.get('balanced_accuracy'):.2f}")
        print(f"report: {args.out}/models/pooled/test (metrics.json, predictions.csv, roc.png, calibration.png,"
              " heatmaps/)")
        if not args.no_federation:
            scored = compare_demo_models(args.out, reports, seed=args.seed, progress=progress, timer=timer)
            print("\nheld-out slides of every site, same total epochs (AUC with a bootstrap 95% CI):")
            print(format_table(scored))
            print(f"comparison: {args.out}/comparison.csv; federation: {args.out}/models/federated "
                  "(best.pt, last.pt, metrics.jsonl, metrics.png)")
            if not args.no_unseen:
                unseen = unseen_demo(args.out, reports, seed=args.seed, progress=progress, timer=timer)
                print("\nunseen site: trained on the other sites, scored on every slide of the one left out:")
                print(format_unseen(unseen))
                print(f"unseen sites: {args.out}/unseen_sites.csv (models in {args.out}/unseen/)")
                plot_comparison(scored, args.out / "comparison.png", unseen=unseen)
            print(f"plot: {args.out}/comparison.png")
    print(f"\ntime: {timer.format()} (wall {time.perf_counter() - started:.0f} s)")
    return EXIT_OK
