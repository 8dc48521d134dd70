"""``wsi-fl preprocess``: tissue detection, tiling at a physical resolution and feature extraction.

Writes ``OUT/features/<slide_id>.h5``, ``OUT/qc/<slide_id>.png`` and
``OUT/manifest.csv``. A slide's id is its file name without the suffix; a
DICOM slide's (a folder of .dcm files) is its folder's name. A slide with no
tile is ``empty``, with the reason. Exit code 0 if every slide is ok, skipped
or empty, 1 if any failed (the others are still processed), 2 on bad options. After a job array
(``--shard``), ``--merge-manifests`` joins the shards' manifests into
``OUT/manifest.csv`` (same exit codes).
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

from preprocessing.params import STAIN_METHODS, QCParams, StainParams, TilingParams, TissueParams
from wsi_fl.cli._args import add_dataclass_args, dataclass_from_args
from wsi_fl.cli._common import EXIT_FAILED, EXIT_OK, UsageError, add_threads_option

#: Tiling fields whose default is the encoder card's (µm/px and tile size it was trained at).
CARD_TILING = ("target_mpp", "tile_size")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("preprocess", help="slides -> per-slide HDF5 feature files", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--slides", nargs="+", required=True, metavar="PATH",
                   help="slide files and/or directories (searched recursively)")
    p.add_argument("--out", type=Path, required=True, help="output directory")
    g = p.add_argument_group("tiling")
    g.add_argument("--target-mpp", type=float, metavar="TARGET_MPP",
                   help="µm/px of the tiles (default: the encoder card's, e.g. 0.5; 0.5 for a model file)")
    g.add_argument("--tile-size", type=int, metavar="TILE_SIZE",
                   help="tile side in px at the target MPP (default: the encoder card's, e.g. 256 for uni_v1;"
                        " 224 for a model file)")
    add_dataclass_args(g, TilingParams, exclude=CARD_TILING)
    g = p.add_argument_group("tissue detection")
    add_dataclass_args(g, TissueParams, prefix="tissue-")
    qc = QCParams()
    g = p.add_argument_group("per-tile QC", "measured on every tile and stored in the feature file (qc/);"
                             " tiles failing a threshold are left out before the encoder and shown in the QC image")
    g.add_argument("--no-tile-qc", action="store_true", help="exclude no tile (the measures are still stored)")
    g.add_argument("--qc-blur", type=float, metavar="RATIO", default=qc.min_sharpness_ratio,
                   help="exclude tiles whose sharpness (Laplacian variance) is below RATIO x the slide's median"
                        f" (default {qc.min_sharpness_ratio}; 0: off)")
    g.add_argument("--qc-min-sharpness", type=float, metavar="VALUE",
                   help="also exclude tiles whose Laplacian variance is below VALUE (absolute, per scanner;"
                        " default off)")
    g.add_argument("--qc-pen", type=float, metavar="FRACTION", default=qc.max_pen_fraction,
                   help=f"exclude tiles with more than FRACTION pen ink (default {qc.max_pen_fraction}; 1: off)")
    g.add_argument("--qc-fold", type=float, metavar="FRACTION", default=qc.max_fold_fraction,
                   help=f"exclude tiles with more than FRACTION tissue fold (default {qc.max_fold_fraction}; 1: off)")
    g = p.add_argument_group("stain", "every site of a federation must use the same settings: training refuses"
                             " features normalised differently")
    g.add_argument("--stain", choices=STAIN_METHODS, default="none",
                   help="stain normalisation of tiles before the encoder (default: none)")
    g.add_argument("--stain-reference", metavar="IMAGE",
                   help="reference image (PNG/JPEG/TIFF tile of well-stained tissue) for --stain; default: built in"
                        " (Macenko et al.'s published H&E reference)")
    g.add_argument("--hed-jitter", type=float, default=0.0, metavar="SIGMA",
                   help="stain augmentation: scale each tile's H, E, D by 1 + N(0, SIGMA), seeded per slide and"
                        " tile (default 0: off)")
    g.add_argument("--stain-seed", type=int, default=0, help="seed of --hed-jitter (default 0)")
    g = p.add_argument_group("resolution (MPP)")
    g.add_argument("--mpp-csv", type=Path, help="CSV slide_id,mpp: per-slide level-0 µm/px (overrides the file)")
    g.add_argument("--default-mpp", type=float, help="µm/px for slides whose file records none")
    g = p.add_argument_group("encoder")
    g.add_argument("--encoder", default="resnet50_trunc",
                   help="registered encoder name (`wsi-fl encoders` lists them), or a TorchScript (.pt) or"
                        " torch.export (.pt2) file (default: resnet50_trunc)")
    g.add_argument("--weights", type=Path, metavar="FILE|DIR",
                   help="weight file (.safetensors, .bin, .pth) or a folder holding the release (a model-hub"
                        " snapshot or hub cache); default: found in --weights-dir or the hub cache; never downloaded")
    g.add_argument("--weights-dir", type=Path, metavar="DIR",
                   help="the site's weights catalogue: DIR/weights.json, DIR/<encoder>/<file> or a hub cache"
                        " layout (default: $WSI_FL_WEIGHTS_DIR)")
    g.add_argument("--random-init", action="store_true",
                   help="use randomly initialised weights (tests and demos; recorded in every output file)")
    g.add_argument("--feature-dtype", choices=("float32", "float16"), default="float32")
    g.add_argument("--batch-size", type=int, help="tiles per forward pass (default: chosen for the device)")
    g.add_argument("--num-workers", type=int, help="tile-reading worker processes (default: chosen)")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    g.add_argument("--precision", choices=("fp32", "fp16", "bf16"),
                   help="inference precision on the device (default: the card's, fp32 on CPU); bf16 on a CPU with"
                        " AVX512-BF16/AMX is ~1.4x faster for ViTs, features within cosine 0.999; recorded")
    g = p.add_argument_group("batch")
    g.add_argument("--shard", help="i/n: process every n-th slide from the i-th (0-based), or 'auto': SLURM's"
                                   " (SLURM_ARRAY_TASK_ID - _MIN) / _STEP of SLURM_ARRAY_TASK_COUNT, or"
                                   " JOB_COMPLETION_INDEX of WSI_FL_SHARD_COUNT (Kubernetes); WSI_FL_SHARD_COUNT"
                                   " under SLURM: redo some tasks of an earlier array (task id = shard)")
    g.add_argument("--merge-manifests", action="store_true",
                   help="process nothing: merge OUT/manifest.shard-I-of-N.csv of a finished job array into"
                        " OUT/manifest.csv, checking that every slide of --slides has a row")
    g.add_argument("--overwrite", action="store_true", help="redo slides even when their outputs are valid")
    g.add_argument("--no-qc", action="store_true", help="do not write QC images")
    g.add_argument("--quiet", action="store_true", help="no progress bars")
    add_threads_option(g)
    p.set_defaults(func=run)


def _card_tiling(args: argparse.Namespace) -> dict[str, float | int]:
    """``--target-mpp``/``--tile-size`` as given, else the encoder card's (TilingParams' defaults for a file)."""
    from preprocessing.cards import CARDS

    card = CARDS.get(args.encoder) if args.encoder in CARDS else None
    default = TilingParams()
    mpp, size = (card.mpp, card.tile_size) if card else (default.target_mpp, default.tile_size)
    return {"target_mpp": mpp if args.target_mpp is None else args.target_mpp,
            "tile_size": size if args.tile_size is None else args.tile_size}


def run(args: argparse.Namespace) -> int:
    # Bad options and inputs (shard, MPP table, encoder, manifests) raise preprocessing's own errors, which
    # wsi_fl.cli.main reports in one line; anything else is a bug and keeps its traceback.
    tiling = dataclass_from_args(TilingParams, args, **_card_tiling(args))  # checked before the heavy imports
    tissue = dataclass_from_args(TissueParams, args, prefix="tissue-")
    tile_qc = QCParams(enabled=not args.no_tile_qc, min_sharpness_ratio=args.qc_blur or None,
                       min_sharpness=args.qc_min_sharpness, max_pen_fraction=args.qc_pen,
                       max_fold_fraction=args.qc_fold)
    stain = StainParams(method=args.stain, reference=args.stain_reference, hed_jitter=args.hed_jitter,
                        seed=args.stain_seed)
    from preprocessing.mpp import read_mpp_csv
    from preprocessing.pipeline import (
        PreprocessConfig,
        discover_slides,
        merge_manifests,
        parse_shard,
        read_manifest,
        run_preprocess,
    )
    from preprocessing.runtime import use_threads

    cfg = PreprocessConfig(
        out_dir=args.out,
        tiling=tiling, tissue=tissue, tile_qc=tile_qc, stain=stain,
        encoder=args.encoder, weights=args.weights, random_init=args.random_init,
        weights_dir=args.weights_dir,
        feature_dtype=args.feature_dtype, batch_size=args.batch_size, num_workers=args.num_workers,
        device=args.device, precision=args.precision, mpp_table=read_mpp_csv(args.mpp_csv) if args.mpp_csv else {},
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
        with use_threads(args.threads):
            rows = [vars(r) for r in run_preprocess(slides, cfg, shard=shard)]
    counts = Counter(r["status"] for r in rows)
    tiles = sum(int(r["n_tiles"]) for r in rows)
    print(f"{len(rows)} slides: {counts['ok']} ok, {counts['skipped']} skipped, {counts['empty']} empty,"
          f" {counts['failed']} failed; {tiles} tiles -> {args.out}")
    for r in rows:
        if r["status"] == "failed":
            print(f"  failed: {r['error']}")
        elif r["status"] == "empty":  # a feature file with nothing to learn from: left out of training
            print(f"  empty: {r['slide_id']}: {r['error']}")
    return EXIT_FAILED if counts["failed"] else EXIT_OK
