"""``wsi-fl evaluate``: metrics with confidence intervals, report plots and attention maps for a checkpoint.

Refuses feature files from another encoder, weights, resolution or tile size
than the checkpoint was trained on.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="evaluate a trained model on a feature directory", description=__doc__)
    p.add_argument("--model", type=Path, required=True, help="checkpoint (model.pt from wsi-fl train)")
    p.add_argument("--features", type=Path, required=True, help="feature directory (from wsi-fl preprocess)")
    p.add_argument("--labels", type=Path, required=True, help="labels CSV slide_id,label[,patient_id]")
    p.add_argument("--out", type=Path, required=True, help="report directory")
    p.add_argument("--label-col", default="label")
    p.add_argument("--threshold", type=float, default=0.5, help="on P(positive class) (default: 0.5)")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the AUC CI")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--slides", type=Path, nargs="+", default=[], metavar="DIR",
                   help="where the slide files are (for heatmap images)")
    p.add_argument("--heatmap-slides", nargs="+", default=[], metavar="SLIDE_ID", help="slides to draw")
    p.add_argument("--heatmap-top-k", type=int, default=0, help="also draw the k slides most likely positive")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from wsi_fl.cli.main import UsageError
    from wsi_fl.evaluation.evaluate import EvalOptions, evaluate_checkpoint

    opts = EvalOptions(threshold=args.threshold, n_bootstrap=args.bootstrap, seed=args.seed,
                       heatmap_slides=tuple(args.heatmap_slides), heatmap_top_k=args.heatmap_top_k)
    try:
        m = evaluate_checkpoint(args.model, args.features, args.labels, args.out, label_col=args.label_col,
                                slide_dirs=args.slides, opts=opts)
    except ValueError as err:
        raise UsageError(str(err)) from err
    keys = ("n", "auc", "auc_ci95", "accuracy", "balanced_accuracy", "sensitivity", "specificity", "brier")
    print(json.dumps({k: m.get(k) for k in keys}))
    print(f"report: {args.out}")
    return 0
