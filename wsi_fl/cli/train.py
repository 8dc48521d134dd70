"""``wsi-fl train``: local (one site) or pooled (several sites) attention-MIL training.

Each ``--site NAME FEATURES_DIR LABELS_CSV`` adds one hospital's feature
directory (from ``wsi-fl preprocess``) and labels file
(``slide_id,label[,patient_id][,split]``). Splits are patient-level: the labels'
``split`` column when every row has one, else a stratified train/val/test split.

``--task survival`` learns time-to-event outcomes from labels
``slide_id,time,event[,patient_id][,split]`` (columns named by --time-col and
--event-col; event 1 = observed, 0 = censored): ``--survival-loss cox`` (risk
sets within a batch and a site; needs --batch-size >= 2) or ``discrete``
(--time-bins hazards). The test report gives Harrell's and Uno's C with
bootstrap intervals, time-dependent AUCs, the integrated Brier score and
Kaplan-Meier curves of the risk groups.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from models.config import MILConfig
from wsi_fl.cli._args import add_dataclass_args, dataclass_from_args
from wsi_fl.cli._common import EXIT_OK, UsageError, add_threads_option
from wsi_fl.mil.config import SplitConfig, TrainConfig


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train an attention-MIL model on one or several sites' features",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--site", nargs=3, action="append", metavar=("NAME", "FEATURES_DIR", "LABELS_CSV"),
                   help="a site's name, feature directory and labels file (repeat for pooled training)")
    p.add_argument("--features", type=Path, help="shortcut for one site: feature directory")
    p.add_argument("--labels", type=Path, help="shortcut for one site: labels CSV")
    p.add_argument("--out", type=Path, required=True, help="output directory (model.pt, splits, history, test/)")
    add_dataclass_args(p.add_argument_group("data and splits"), SplitConfig)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--tune", action="store_true",
                   help="choose lr, weight decay, width and epochs by nested CV on the training split's patients "
                        "before the final fit (grid: wsi_fl.mil.tuning.TuneGrid; about 12x the training time)")
    p.add_argument("--bootstrap", type=int, default=1000, metavar="N",
                   help="bootstrap resamples for the test report's confidence intervals (default: 1000; 0: none)")
    add_threads_option(p)
    add_dataclass_args(p.add_argument_group("model"), MILConfig, exclude=("in_dim", "n_classes"))
    add_dataclass_args(p.add_argument_group("optimisation"), TrainConfig)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # The settings are checked before any site is read (ConfigError); a bad labels file, too few patients or
    # an unknown model name are project errors too, reported in one line by wsi_fl.cli.main.
    model = dataclass_from_args(MILConfig, args, in_dim=1, n_classes=2)  # both derived from the data
    train = dataclass_from_args(TrainConfig, args)
    split = dataclass_from_args(SplitConfig, args)
    import json

    from preprocessing.runtime import use_threads
    from wsi_fl.evaluation.options import EvalOptions
    from wsi_fl.mil.fit import Site, fit

    sites = [Site(name, Path(f), Path(lab)) for name, f, lab in (args.site or [])]
    if args.features or args.labels:
        if not (args.features and args.labels):
            raise UsageError("--features and --labels go together")
        sites.append(Site(args.features.parent.name or "site", args.features, args.labels))
    if not sites:
        raise UsageError("give at least one --site NAME FEATURES_DIR LABELS_CSV (or --features and --labels)")
    with use_threads(args.threads):
        if args.tune:  # settings chosen on inner folds of the training split only (wsi_fl.mil.tuning)
            from wsi_fl.mil.tuning import tune_for_fit

            model, train, tuned = tune_for_fit(sites, model, train, label_col=split.label_col,
                                               val_frac=split.val_frac, test_frac=split.test_frac,
                                               time_col=split.time_col, event_col=split.event_col)
            print("tuned:", json.dumps({**tuned.best, "inner_cv_score": round(tuned.score, 4)}))
        result = fit(sites, args.out, model=model, train=train, label_col=split.label_col,
                     val_frac=split.val_frac, test_frac=split.test_frac, progress=not args.quiet,
                     time_col=split.time_col, event_col=split.event_col,
                     eval_opts=EvalOptions(n_bootstrap=args.bootstrap))
    print(f"model: {result.checkpoint} (best epoch {result.best_epoch}; splits {result.split_sizes})")
    if result.test_metrics:
        m = result.test_metrics
        keys = ("n", "auc", "auc_ci95", "accuracy", "balanced_accuracy", "sensitivity", "specificity", "brier")
        if train.task == "survival":
            keys = ("n", "events", "c_index", "c_index_ci95", "uno_c_index", "uno_c_index_ci95", "time_auc",
                    "integrated_brier_score")
        print("test:", json.dumps({k: m.get(k) for k in keys}))
    return EXIT_OK
