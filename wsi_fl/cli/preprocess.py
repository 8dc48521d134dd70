"""``wsi-fl preprocess``: tissue detection, tiling at a physical resolution and feature extraction.

Writes ``OUT/features/<slide_id>.h5``, ``OUT/qc/<slide_id>.png`` and
``OUT/manifest.csv``. Exit code 0 if every slide is ok or skipped, 1 if any
failed (the others are still processed), 2 on bad options. After a job array
(``--shard``), ``--merge-manifests`` joins the shards' manifests into
``OUT/manifest.csv`` (same exit codes).
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

from preprocessing.params import TilingParams, TissueParams
from wsi_fl.cli._args import add_dataclass_args, dataclass_from_args
from wsi_fl.cli._common import EXIT_FAILED, EXIT_OK, UsageError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("preprocess", help="slides -> per-slide HDF5 feature files", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--slides", nargs="+", required=True, metavar="PATH",
                   help="slide files and/or directories (searched recursively)")
    p.add_argument("--out", type=Path, required=True, help="output directory")
    g = p.add_argument_group("tiling")
    add_dataclass_args(g, TilingParams)
    g = p.add_argument_group("tissue detection")
    add_dataclass_args(g, TissueParams, prefix="tissue-")
    g = p.add_argument_group("resolution (MPP)")
    g.add_argument("--mpp-csv", type=Path, help="CSV slide_id,mpp: per-slide level-0 µm/px (overrides the file)")
    g.add_argument("--default-mpp", type=float, help="µm/px for slides whose file records none")
    g = p.add_argument_group("encoder")
    g.add_argument("--encoder", default="resnet50_trunc",
                   help="registered encoder name or a TorchScript file (default: resnet50_trunc)")
    g.add_argument("--weights", type=Path, help="weights file (default: the local torch cache; never downloaded)")
    g.add_argument("--random-init", action="store_true",
                   help="use randomly initialised weights (tests and demos; recorded in every output file)")
    g.add_argument("--feature-dtype", choices=("float32", "float16"), default="float32")
    g.add_argument("--batch-size", type=int, help="tiles per forward pass (default: chosen for the device)")
    g.add_argument("--num-workers", type=int, help="tile-reading worker processes (default: chosen)")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    g = p.add_argument_group("batch")
    g.add_argument("--shard", help="i/n: process every n-th slide from the i-th (0-based), or 'auto' to read"
                                   " SLURM_ARRAY_TASK_ID/COUNT or JOB_COMPLETION_INDEX+WSI_FL_SHARD_COUNT")
    g.add_argument("--merge-manifests", action="store_true",
                   help="process nothing: merge OUT/manifest.shard-I-of-N.csv of a finished job array into"
                        " OUT/manifest.csv, checking that every slide of --slides has a row")
    g.add_argument("--overwrite", action="store_true", help="redo slides even when their outputs are valid")
    g.add_argument("--no-qc", action="store_true", help="do not write QC images")
    g.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # Bad options and inputs (shard, MPP table, encoder, manifests) raise preprocessing's own errors, which
    # wsi_fl.cli.main reports in one line; anything else is a bug and keeps its traceback.
    tiling = dataclass_from_args(TilingParams, args)  # checked before the heavy imports below
    tissue = dataclass_from_args(TissueParams, args, prefix="tissue-")
    from preprocessing.mpp import read_mpp_csv
    from preprocessing.pipeline import (
        PreprocessConfig,
        discover_slides,
        merge_manifests,
        parse_shard,
        read_manifest,
        run_preprocess,
    )

    cfg = PreprocessConfig(
        out_dir=args.out,
        tiling=tiling, tissue=tissue, encoder=args.encoder, weights=args.weights, random_init=args.random_init,
        feature_dtype=args.feature_dtype, batch_size=args.batch_size, num_workers=args.num_workers,
        device=args.device, mpp_table=read_mpp_csv(args.mpp_csv) if args.mpp_csv else {},
        default_mpp=args.default_mpp, overwrite=args.overwrite, qc=not args.no_qc, progress=not args.quiet,
    )
    shard = parse_shard(args.shard) if args.shard else None
    slides = discover_slides(args.slides)
    if not slides:
        raise UsageError(f"no slide files found in {' '.join(args.slides)}")
    if args.merge_manifests:
        if shard:
            raise UsageError("--merge-manifests joins the manifests of every shard: leave out --shard")
        rows = read_manifest(merge_manifests(args.out, slides))
        print(f"merged shard manifests -> {args.out / 'manifest.csv'}")
    else:
        rows = [vars(r) for r in run_preprocess(slides, cfg, shard=shard)]
    counts = Counter(r["status"] for r in rows)
    tiles = sum(int(r["n_tiles"]) for r in rows)
    print(f"{len(rows)} slides: {counts['ok']} ok, {counts['skipped']} skipped, {counts['failed']} failed;"
          f" {tiles} tiles -> {args.out}")
    for r in rows:
        if r["status"] == "failed":
            print(f"  failed: {r['error']}")
    return EXIT_FAILED if counts["failed"] else EXIT_OK
