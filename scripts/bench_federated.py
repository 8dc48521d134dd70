"""Federated vs pooled vs local attention-MIL on non-IID three-site splits, and the federation's overhead.

Protocol (one configuration for everything, :class:`Protocol`): MILConfig
defaults (gated attention), AdamW, lr 5e-4, weight decay 1e-3, no class
weights, no early stopping (the last epoch's model is scored), every site
split on its own into train/val/test = 0.60/0.15/0.25 by patient with the run's
seed. Every training mode runs the same total epochs E (``--epochs``):

* pooled: :func:`wsi_fl.mil.fit.fit` on all sites' training bags, E epochs;
* local: the same on one site, E epochs, for every site; "best local" is, per
  seed, the highest of the sites' local AUCs (the strictest reading); the goal
  lines also give "best site", the site whose local model has the highest mean
  AUC over seeds (a site keeps its role across seeds: the 0.8-positive or the
  55 % site is always site_3);
* federated: E rounds of 1 local epoch per site, for every strategy in
  ``--strategies``, with the real ClientApp/ServerApp (in-process InlineGrid by
  default, identical results to ``--engine simulation``); the last round's
  global model is scored.

All models of a seed are scored with :func:`wsi_fl.evaluation.compare.score_models` on the
same slides: the union of every site's held-out test split. The table shows the
mean ± sample std (ddof 1) of that test AUC over seeds.

Datasets. The classic MIL bag tables in ``$WSI_FL_TESTDATA/mil`` (default
``../shared/data/mil``; musk1, musk2, fox, tiger): every bag becomes one HDF5
feature file (instances z-scored per feature with the mean/std of the *whole*
table, all bags of both classes, a label-free transductive normalisation shared
by every training mode; coords a dummy grid; patient id = bag id). The bags are
dealt to three sites by a seeded, deterministic non-IID split:

* ``label`` skew: site positive rates about 0.2 / 0.5 / 0.8 at similar sizes
  (positives dealt 0.2:0.5:0.8, negatives 0.8:0.5:0.2; exact when the table is
  balanced, e.g. musk2's 38 % positives gives about 0.13 / 0.38 / 0.71);
* ``size`` skew: sites get about 15 % / 30 % / 55 % of the bags, stratified by label.

Every site keeps at least 2 bags of each class. The seed picks the partition as
well as the weights and splits, so the spread over seeds includes the partition's.
``--synthetic DIR`` adds an existing cohort directory used as is (e.g. the
``cohort/`` of ``wsi-fl demo``, whose sites differ by stain; every site needs
``features/`` and ``labels.csv``), shown as ``synthetic/as-is``.

``--server-step S`` runs FedAvg/FedProx with that server step (``FedConfig.server_step``; 0: auto, the
effective number of sites); their results are stored as ``fedavg step S`` beside the plain ones, and the
other models' results are shared, so ``--strategies fedavg --server-step 0 --resume`` on an existing results
file adds one column. ``--proximal-mu M`` does the same for FedProx's mu (default FedConfig's, 1; results are
named ``fedprox mu M``, and plain ``fedprox`` is mu 0.01, ``LEGACY_MU``, the default the first results were run
under: give ``--proximal-mu 0.01`` to print or extend those).

``--datasets realistic`` adds the synthetic ``realistic`` preset (:mod:`preprocessing.synth`): three
hospitals of 2 : 1 : 0.4 × ``--realistic-slides`` slides (default 10: 20, 10 and 4 slides), prevalence
0.1 / 0.35 / 0.6, weak planted signal, per-site stain, scanner blur, JPEG quality and native µm/px, pen marks,
folds and blur; every slide is tiled at 0.5 µm/px and embedded with ``resnet18_trunc`` random-init (as
``wsi-fl demo``), cached per seed under ``<work>/realistic/n<slides>-seed<k>``. The seed draws new slides;
its sites are the preset's, shown as ``realistic/as-is``. Same :class:`Protocol`, every strategy.

``--unseen`` adds the unseen-site column (:func:`wsi_fl.benchmarks.federated.run_unseen`): each site in
turn is left out; pooled ``fit`` (E epochs) and FedAvg (E rounds of one local epoch, InlineGrid) train on
every slide of the other sites (no val/test split), and each is scored on all slides of the site left out
(AUC, bootstrap 95 % CI, :mod:`wsi_fl.evaluation.unseen`). Stored as ``unseen pooled`` and ``unseen fedavg``,
whose ``auc`` is the mean over held-out sites of that seed; printed as a second table beside the seen test
AUC. ``--smoke`` runs the realistic path small (3 slides per site, 2 epochs, seed 0, FedAvg, ``--unseen``,
no validation split, as for every realistic run): a check that it runs, not a result. The realistic dataset
runs the :class:`Protocol` with ``val_frac = 0`` (train/test 0.75/0.25 per site): its site 3, 4 slides of 3
patients, cannot be split three ways, and nothing is selected on validation slides (fixed epochs, last model).

Goals checked under the table: the better of FedAvg/FedProx (mean over seeds)
≥ pooled − 0.02 and ≥ best local. ``--overhead`` (first dataset and skew, first
seed, FedAvg) times pooled ``fit`` against the real simulation engine
(``wsi_fl.engines.simulation.simulate``, Ray start-up included) and the inline engine at
the same epochs (goal: simulation ÷ pooled ≤ 1.5), and reports the bytes each
site sent per round against the model's float32 size (4 × parameters; goal
≤ 1.05×) and a float16-transport run's bytes and test-AUC loss (goals ½ and ≤ 0.01).
``--deployment`` adds the deployment engine (a SuperLink and three SuperNodes on
loopback, ``wsi-fl rehearse``) at the same seed: its time and its
test AUC against the simulation's (goal: within 0.01).

The dataset ``wsiscale`` (``--datasets wsiscale``) is for timing: ``--wsi-scale
BAGS INSTANCES`` random 1024-d float16 bags, sized like whole-slide embeddings
(a 20× slide gives thousands of tiles), half of them with a small planted
signal. Simulation start-up (a Ray cluster, ~30 s here) is a fixed cost, so the
overhead ratio depends on the workload: the MIL tables' bags have 2-100
instances and train in seconds, which no fixed cost can hide.

Every run is appended as one JSON line to ``--results`` (default
``<work>/results.jsonl``); ``--resume`` skips runs already there with the same
protocol and epochs, and the table is built from the file, so interrupted
benchmarks keep their work. The full benchmark (hours on 2 cores)::

    python scripts/bench_federated.py --work /tmp/benchfed --resume [--synthetic demo-out/cohort] [--overhead]

Overhead at whole-slide scale, and the deployment engine against the simulation::

    python scripts/bench_federated.py --datasets wsiscale --skews size --seeds 0 --overhead --no-table
    python scripts/bench_federated.py --datasets musk1 --skews label --seeds 0 --epochs 10 --overhead \
        --no-table --deployment

The realistic cohort with the unseen-site column (docs/federated-benchmark.md, issue 19)::

    python scripts/bench_federated.py --datasets realistic --unseen --work /tmp/bf19 --resume

A small check::

    python scripts/bench_federated.py --datasets musk1 --skews label --seeds 0 --strategies fedavg fedprox --epochs 10
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import tempfile
from pathlib import Path

import torch

from wsi_fl.benchmarks.cohorts import (
    DATASETS,
    REALISTIC,
    REALISTIC_SLIDES,
    SKEWS,
    Cohort,
    build_cohort,
    realistic_cohort,
    synthetic_cohort,
)
from wsi_fl.benchmarks.federated import (
    ENGINES,
    LEGACY_MU,
    STRATEGIES,
    Protocol,
    print_unseen_table,
    run_cohort,
    run_unseen,
)
from wsi_fl.benchmarks.overhead import overhead
from wsi_fl.benchmarks.results import Results, print_table


def parse_args() -> argparse.Namespace:
    root = Path(__file__).resolve().parent.parent
    default_data = Path(os.environ.get("WSI_FL_TESTDATA", root.parent / "shared" / "data")) / "mil"
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=default_data, help="directory of the bag tables <name>.csv")
    ap.add_argument("--datasets", nargs="*", default=list(DATASETS),
                    help=f"bag tables, and/or {REALISTIC!r}: the synthetic realistic-preset cohort, preprocessed "
                         "(none: only --synthetic)")
    ap.add_argument("--realistic-slides", type=int, default=REALISTIC_SLIDES,
                    help="slides per site of the realistic cohort before the preset's size factors [%(default)s]")
    ap.add_argument("--unseen", action="store_true",
                    help="also leave each site out in turn (pooled and FedAvg on the others, scored on all of it)")
    ap.add_argument("--smoke", action="store_true",
                    help="a quick check of the realistic path: 3 slides per site, 2 epochs, seed 0, fedavg, --unseen")
    ap.add_argument("--skews", nargs="+", default=list(SKEWS), choices=SKEWS)
    ap.add_argument("--synthetic", type=Path, help="an existing cohort directory, used as is")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    ap.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=STRATEGIES)
    ap.add_argument("--epochs", type=int, default=Protocol.epochs, help="total epochs of every training mode")
    ap.add_argument("--server-step", type=float, default=1.0,
                    help="FedAvg/FedProx server step (1: plain FedAvg; 0: auto, the effective number of sites)")
    ap.add_argument("--proximal-mu", type=float, default=Protocol.proximal_mu,
                    help=f"FedProx's proximal weight mu [%(default)s]; results under any other mu than {LEGACY_MU} "
                         "(the stored results' mu) are named 'fedprox mu M'")
    ap.add_argument("--engine", choices=sorted(ENGINES), default="inline")
    ap.add_argument("--work", type=Path, help="cohorts, models and results (default: a new temporary directory)")
    ap.add_argument("--results", type=Path, help="JSON-lines results file (default: <work>/results.jsonl)")
    ap.add_argument("--resume", action="store_true", help="skip runs already in the results file")
    ap.add_argument("--overhead", action="store_true", help="also time pooled vs federated and measure bytes")
    ap.add_argument("--no-table", action="store_true", help="only the overhead (with --overhead)")
    ap.add_argument("--deployment", action="store_true",
                    help="with --overhead: also run the deployment engine (SuperLink + SuperNodes on loopback)")
    ap.add_argument("--wsi-scale", nargs=2, type=int, default=[60, 4000], metavar=("BAGS", "INSTANCES"),
                    help="size of the 'wsiscale' dataset: random 1024-d bags like whole-slide embeddings "
                         "[%(default)s]")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (and OMP_NUM_THREADS for Ray workers)")
    ap.add_argument("--verbose", action="store_true", help="show Flower's per-round log")
    return ap.parse_args()


def main() -> int:
    args = parse_args()
    if args.smoke:
        args.datasets, args.skews, args.seeds, args.strategies = [REALISTIC], ["label"], [0], ["fedavg"]
        args.epochs, args.realistic_slides, args.unseen = 2, 3, True
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    torch.set_num_threads(args.threads)
    if not args.verbose:
        import flwr.common  # noqa: F401  (sets Flower's logger to DEBUG on import: quieten it afterwards)

        logging.getLogger("flwr").setLevel(logging.WARNING)
    work = (args.work or Path(tempfile.mkdtemp(prefix="benchfed-"))).resolve()
    work.mkdir(parents=True, exist_ok=True)
    results = Results(args.results or work / "results.jsonl")
    print(f"work directory {work}; results {results.path}", flush=True)
    proto = Protocol(epochs=args.epochs, server_step=args.server_step, proximal_mu=args.proximal_mu)

    def proto_for(dataset: str) -> Protocol:
        # The realistic cohort's site 3 (4 slides, 3 patients) cannot be split three ways; nothing is selected on
        # the validation split (fixed epochs, the last model is scored), so its slides train instead.
        return dataclasses.replace(proto, val_frac=0.0) if dataset == REALISTIC else proto

    def cohorts_for(dataset: str, skew: str) -> list[Cohort]:
        if dataset == "synthetic":
            return [synthetic_cohort(args.synthetic, seed) for seed in args.seeds]
        if dataset == REALISTIC:
            return [realistic_cohort(work, seed, args.realistic_slides) for seed in args.seeds]
        return [build_cohort(work, args.data / f"{dataset}.csv", dataset, skew, seed, tuple(args.wsi_scale))
                for seed in args.seeds]

    combos = [(d, s) for d in args.datasets if d != REALISTIC for s in args.skews]
    if REALISTIC in args.datasets:
        combos.append((REALISTIC, "as-is"))  # its sites are the preset's hospitals: no partition, no skew to choose
    if args.synthetic is not None:
        combos.append(("synthetic", "as-is"))
    if not combos:
        print("nothing to run: give --datasets or --synthetic", file=sys.stderr)
        return 2
    if not args.no_table:
        for dataset, skew in combos:
            for cohort in cohorts_for(dataset, skew):
                run_cohort(cohort, results, work / "runs", proto_for(dataset), args.strategies, args.engine,
                           args.resume)
                if args.unseen:
                    run_unseen(cohort, results, work / "runs", proto_for(dataset), args.resume)
        for group in ([c for c in combos if c[0] != REALISTIC], [c for c in combos if c[0] == REALISTIC]):
            if group:  # one table per protocol: a result counts only under its own fingerprint
                print_table(results, proto_for(group[0][0]), group, args.seeds, args.strategies)
                if args.unseen:
                    print_unseen_table(results, proto_for(group[0][0]), group, args.seeds)
    if args.overhead:
        overhead(cohorts_for(*combos[0])[0], work, proto, results, args.deployment)
    return 0


if __name__ == "__main__":
    sys.exit(main())
