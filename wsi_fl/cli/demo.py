"""``wsi-fl demo``: the README's main job (synthetic cohort -> per-site preprocessing -> federated, pooled and
local MIL models, compared on the same held-out slides)."""

from __future__ import annotations

import argparse
from pathlib import Path

from wsi_fl.cli._common import EXIT_FAILED, EXIT_OK


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run the main job on a synthetic three-site cohort", description=__doc__)
    p.add_argument("--out", type=Path, default=Path("demo-out"), help="output directory (default: demo-out)")
    p.add_argument("--sites", type=int, default=3)
    p.add_argument("--slides-per-site", type=int, default=6)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-train", action="store_true", help="stop after preprocessing")
    p.add_argument("--no-federation", action="store_true", help="train the pooled model only")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from wsi_fl.demo import compare_demo_models, format_reports, run_demo, train_demo_model
    from wsi_fl.evaluation.compare import format_table

    reports = run_demo(args.out, sites=args.sites, slides_per_site=args.slides_per_site, seed=args.seed,
                       progress=not args.quiet)
    print(format_reports(reports))
    print(f"QC images: {args.out}/cohort/<site>/qc/*.png")
    if any(r.failed for r in reports):
        return EXIT_FAILED
    if not args.no_train:
        result = train_demo_model(args.out, reports, seed=args.seed, progress=not args.quiet)
        m = result.test_metrics or {}
        ci = m.get("auc_ci95") or [float("nan")] * 2
        print(f"pooled gated-attention MIL: splits {result.split_sizes}, {result.best_epoch + 1} epochs")
        print(f"held-out test: n={m.get('n')} AUC={m.get('auc')} (95% CI {ci[0]:.2f}-{ci[1]:.2f})"
              f" accuracy={m.get('accuracy'):.2f} balanced accuracy={m.get('balanced_accuracy'):.2f}")
        print(f"report: {args.out}/models/pooled/test (metrics.json, predictions.csv, roc.png, calibration.png,"
              " heatmaps/)")
        if not args.no_federation:
            scored = compare_demo_models(args.out, reports, seed=args.seed, progress=not args.quiet)
            print("\nheld-out slides of every site, same total epochs:")
            print(format_table(scored))
            print(f"comparison: {args.out}/comparison.csv, {args.out}/comparison.png; federation: "
                  f"{args.out}/models/federated (best.pt, last.pt, metrics.jsonl, metrics.png)")
    return EXIT_OK
