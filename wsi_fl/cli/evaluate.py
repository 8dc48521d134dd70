"""``wsi-fl evaluate``: metrics with confidence intervals, report plots and attention maps for a checkpoint.

By default it scores only the slides the model was not trained on: the held-out test split, redrawn from
the split record in the checkpoint (seed, fractions, patient-level rule, label column) exactly as training
drew it for these labels. ``--split val`` scores the validation split, ``--split all`` every slide given;
``metrics.json`` (``evaluated``) and the printed summary say which split was scored and how many slides
were left out, and ``--split all`` is labelled as possibly including training slides. A checkpoint made
before split records needs labels with a complete ``split`` column, or ``--split all``.

When the labels name each slide's site (a ``site`` column, or ``--site-col``), every site is also scored on its
own: AUC with bootstrap CI per site in ``metrics.json`` (``per_site``), ``per_site.csv`` and the printout, and the
held-out split is redrawn site by site, as training split every site on its own.

Refuses feature files from another encoder, weights, resolution or tile size than the checkpoint was
trained on.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from wsi_fl.cli._args import add_dataclass_args, dataclass_from_args
from wsi_fl.cli._common import EXIT_OK, add_threads_option
from wsi_fl.evaluation.options import SPLIT_CHOICES, EvalOptions


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="evaluate a trained model on a feature directory", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, required=True, help="checkpoint (model.pt from wsi-fl train, best.pt)")
    p.add_argument("--features", type=Path, required=True, help="feature directory (from wsi-fl preprocess)")
    p.add_argument("--labels", type=Path, required=True, help="labels CSV slide_id,label[,patient_id][,split]")
    p.add_argument("--out", type=Path, required=True, help="report directory")
    p.add_argument("--split", choices=SPLIT_CHOICES, default=None,
                   help="which slides to score: test (default: the held-out split of the model's training), "
                        "val, or all (every slide given, including any the model was trained on)")
    p.add_argument("--label-col", default=None, help="outcome column (default: the one the model was trained on)")
    p.add_argument("--site-col", default=None, metavar="COL",
                   help="labels column naming each slide's site: per-site AUC with CI too, each site's split redrawn "
                        "on its own (default: 'site' when the labels have it)")
    add_dataclass_args(p, EvalOptions, exclude=("heatmap_slides", "top_tiles"))
    p.add_argument("--slides", type=Path, nargs="+", default=[], metavar="DIR",
                   help="where the slide files are (for heatmap images)")
    p.add_argument("--heatmap-slides", nargs="+", default=[], metavar="SLIDE_ID", help="slides to draw")
    add_threads_option(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # A checkpoint, labels file or feature directory that does not fit is a project error (CheckpointError,
    # BagDataError, ProvenanceError), reported in one line by wsi_fl.cli.main.
    opts = dataclass_from_args(EvalOptions, args, exclude=("top_tiles",), heatmap_slides=tuple(args.heatmap_slides))
    import json

    from preprocessing.runtime import use_threads
    from wsi_fl.evaluation.evaluate import evaluate_checkpoint

    with use_threads(args.threads):
        m = evaluate_checkpoint(args.model, args.features, args.labels, args.out, label_col=args.label_col,
                                split=args.split, slide_dirs=args.slides, opts=opts, site_col=args.site_col)
    keys = ("n", "auc", "auc_ci95", "accuracy", "balanced_accuracy", "sensitivity", "specificity", "brier")
    if m.get("task") == "survival":
        keys = ("n", "events", "c_index", "c_index_ci95", "uno_c_index", "mean_time_auc", "integrated_brier_score")
    print(json.dumps({"split": m["evaluated"]["split"], **{k: m.get(k) for k in keys}}))
    if m.get("per_site"):
        from wsi_fl.evaluation.persite import format_per_site

        print(format_per_site(m["per_site"]))
    print(f"report: {args.out}")
    return EXIT_OK
