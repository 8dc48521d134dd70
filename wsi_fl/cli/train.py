"""``wsi-fl train``: local (one site) or pooled (several sites) attention-MIL training.

Each ``--site NAME FEATURES_DIR LABELS_CSV`` adds one hospital's feature
directory (from ``wsi-fl preprocess``) and labels file
(``slide_id,label[,patient_id][,split]``). Splits are patient-level: the labels'
``split`` column when every row has one, else a stratified train/val/test split.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from wsi_fl.cli._args import add_dataclass_args, dataclass_from_args


def register(sub: argparse._SubParsersAction) -> None:
    from models import MILConfig
    from wsi_fl.mil.training import TrainConfig

    p = sub.add_parser("train", help="train an attention-MIL model on one or several sites' features",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--site", nargs=3, action="append", metavar=("NAME", "FEATURES_DIR", "LABELS_CSV"),
                   help="a site's name, feature directory and labels file (repeat for pooled training)")
    p.add_argument("--features", type=Path, help="shortcut for one site: feature directory")
    p.add_argument("--labels", type=Path, help="shortcut for one site: labels CSV")
    p.add_argument("--out", type=Path, required=True, help="output directory (model.pt, splits, history, test/)")
    p.add_argument("--label-col", default="label", help="outcome column of the labels files (default: label)")
    p.add_argument("--val-frac", type=float, default=0.15, help="validation share of patients (default: 0.15)")
    p.add_argument("--test-frac", type=float, default=0.2, help="test share of patients (default: 0.2)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_dataclass_args(p.add_argument_group("model"), MILConfig, exclude=("in_dim", "n_classes"))
    add_dataclass_args(p.add_argument_group("optimisation"), TrainConfig)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from models import MILConfig
    from wsi_fl.cli.main import UsageError
    from wsi_fl.mil.fit import Site, fit
    from wsi_fl.mil.training import TrainConfig

    sites = [Site(name, Path(f), Path(lab)) for name, f, lab in (args.site or [])]
    if args.features or args.labels:
        if not (args.features and args.labels):
            raise UsageError("--features and --labels go together")
        sites.append(Site(args.features.parent.name or "site", args.features, args.labels))
    if not sites:
        raise UsageError("give at least one --site NAME FEATURES_DIR LABELS_CSV (or --features and --labels)")
    try:
        model = dataclass_from_args(MILConfig, args, in_dim=1, n_classes=2)  # both derived from the data
        train = dataclass_from_args(TrainConfig, args)
        result = fit(sites, args.out, model=model, train=train, label_col=args.label_col, val_frac=args.val_frac,
                     test_frac=args.test_frac, progress=not args.quiet)
    except ValueError as err:
        raise UsageError(str(err)) from err
    print(f"model: {result.checkpoint} (best epoch {result.best_epoch}; splits {result.split_sizes})")
    if result.test_metrics:
        m = result.test_metrics
        keys = ("n", "auc", "auc_ci95", "accuracy", "balanced_accuracy", "sensitivity", "specificity", "brier")
        print("test:", json.dumps({k: m.get(k) for k in keys}))
    return 0
