"""``wsi-fl evaluate``: metrics with confidence intervals, report plots and attention maps for a checkpoint.

Refuses feature files from another encoder, weights, resolution or tile size
than the checkpoint was trained on.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from wsi_fl.cli._args import add_dataclass_args, dataclass_from_args
from wsi_fl.cli._common import EXIT_OK
from wsi_fl.evaluation.options import EvalOptions
from wsi_fl.mil.config import SplitConfig


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="evaluate a trained model on a feature directory", description=__doc__)
    p.add_argument("--model", type=Path, required=True, help="checkpoint (model.pt from wsi-fl train)")
    p.add_argument("--features", type=Path, required=True, help="feature directory (from wsi-fl preprocess)")
    p.add_argument("--labels", type=Path, required=True, help="labels CSV slide_id,label[,patient_id]")
    p.add_argument("--out", type=Path, required=True, help="report directory")
    add_dataclass_args(p, SplitConfig, exclude=("val_frac", "test_frac"))  # --label-col
    add_dataclass_args(p, EvalOptions, exclude=("heatmap_slides", "top_tiles"))
    p.add_argument("--slides", type=Path, nargs="+", default=[], metavar="DIR",
                   help="where the slide files are (for heatmap images)")
    p.add_argument("--heatmap-slides", nargs="+", default=[], metavar="SLIDE_ID", help="slides to draw")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # A checkpoint, labels file or feature directory that does not fit is a project error (CheckpointError,
    # BagDataError, ProvenanceError), reported in one line by wsi_fl.cli.main.
    opts = dataclass_from_args(EvalOptions, args, exclude=("top_tiles",), heatmap_slides=tuple(args.heatmap_slides))
    import json

    from wsi_fl.evaluation.evaluate import evaluate_checkpoint

    m = evaluate_checkpoint(args.model, args.features, args.labels, args.out, label_col=args.label_col,
                            slide_dirs=args.slides, opts=opts)
    keys = ("n", "auc", "auc_ci95", "accuracy", "balanced_accuracy", "sensitivity", "specificity", "brier")
    print(json.dumps({k: m.get(k) for k in keys}))
    print(f"report: {args.out}")
    return EXIT_OK
