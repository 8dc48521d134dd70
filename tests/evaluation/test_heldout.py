"""``wsi-fl evaluate`` cannot score training slides by accident: it redraws the training split from the
checkpoint's record and scores the held-out slides, for local, pooled and federated checkpoints alike."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from bagsites import grid_for, make_cohort, make_site

from models.checkpoint import load_checkpoint, save_checkpoint
from wsi_fl.cli import main
from wsi_fl.errors import ConfigError
from wsi_fl.evaluation.heldout import select_slides
from wsi_fl.evaluation.options import EvalOptions
from wsi_fl.federation.config import FedConfig
from wsi_fl.mil.config import SPLIT_RULE, SplitRecord
from wsi_fl.mil.data import read_labels
from wsi_fl.mil.fit import Site, fit
from wsi_fl.mil.training import TrainConfig
from wsi_fl.server.loop import run_server
from wsi_fl.site.data import load_site

QUICK = TrainConfig(epochs=1, lr=1e-3, seed=3)


def _splits_csv(run: Path, site: str) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    with (run / "splits.csv").open() as f:
        for row in csv.DictReader(f):
            if row["site"] == site:
                out.setdefault(row["split"], set()).add(row["slide_id"])
    return out


def _evaluate(model: Path, site_dir: Path, out: Path, *extra: str) -> int:
    return main(["evaluate", "--model", str(model), "--features", str(site_dir / "features"),
                 "--labels", str(site_dir / "labels.csv"), "--out", str(out), "--bootstrap", "10", *extra])


def _scored(out: Path) -> set[str]:
    with (out / "predictions.csv").open() as f:
        return {r["slide_id"] for r in csv.DictReader(f)}


@pytest.fixture(scope="module")
def pooled(tmp_path_factory):
    root = tmp_path_factory.mktemp("pooled")
    sites = [make_site(root, "a", 20, seed=1), make_site(root, "b", 18, seed=2)]
    fit(sites, root / "run", train=QUICK, eval_opts=EvalOptions(n_bootstrap=10), progress=False)
    return root


def test_evaluate_scores_the_held_out_split_of_a_pooled_model_by_default(pooled, capsys):
    truth = _splits_csv(pooled / "run", "b")
    assert _evaluate(pooled / "run" / "model.pt", pooled / "b", pooled / "report") == 0
    printed = capsys.readouterr().out
    assert _scored(pooled / "report") == truth["test"]  # exactly the slides training held out at site b
    evaluated = json.loads((pooled / "report" / "metrics.json").read_text())["evaluated"]
    n = sum(len(v) for v in truth.values())
    assert evaluated["split"] == "test" and evaluated["held_out"] is True
    assert evaluated["slides_given"] == n and evaluated["slides_left_out"] == n - len(truth["test"])
    assert f"scored the test split: {len(truth['test'])} of {n} slides" in printed
    assert "training site b's, unchanged" in printed and '"split": "test"' in printed

    assert _evaluate(pooled / "run" / "model.pt", pooled / "b", pooled / "val", "--split", "val") == 0
    assert _scored(pooled / "val") == truth["val"]


def test_scoring_training_slides_needs_split_all_and_says_so(pooled, capsys):
    assert _evaluate(pooled / "run" / "model.pt", pooled / "a", pooled / "all", "--split", "all") == 0
    printed = capsys.readouterr().out
    metrics = json.loads((pooled / "all" / "metrics.json").read_text())
    assert metrics["n"] == 20 and _scored(pooled / "all") == set().union(*_splits_csv(pooled / "run", "a").values())
    assert metrics["evaluated"]["split"] == "all" and metrics["evaluated"]["held_out"] is False
    assert "including any the model was trained on" in metrics["evaluated"]["warning"]
    assert "scored ALL 20 slides given (--split all)" in printed and '"split": "all"' in printed


def test_changed_labels_are_not_taken_for_a_training_sites(pooled, tmp_path):
    _, ckpt = load_checkpoint(pooled / "run" / "model.pt")
    records = read_labels(pooled / "a" / "labels.csv", classes=ckpt.classes).records
    chosen = select_slides(ckpt.meta, records[:-1], None)  # a slide dropped since training
    assert chosen.held_out and "not those any training site (a, b) trained with" in chosen.notes[0]


@pytest.fixture(scope="module")
def federated(tmp_path_factory):
    root = tmp_path_factory.mktemp("federated")
    make_cohort(root / "cohort", sizes=(12, 14, 16))
    cfg = FedConfig(num_server_rounds=1, hidden_dim=16, attn_dim=8, auc_bins=20, seed=5, val_frac=0.2,
                    test_frac=0.3, out_dir=str(root / "fed"))
    run_server(grid_for(root / "cohort"), cfg)
    return root


def test_a_federated_checkpoint_records_the_split_but_no_slide_and_a_site_redraws_it(federated, capsys):
    root = federated
    _, ckpt = load_checkpoint(root / "fed" / "best.pt")
    assert ckpt.meta["splits"] == SplitRecord(5, 0.2, 0.3, "label").to_meta()
    assert ckpt.meta["splits"]["rule"] == SPLIT_RULE and ckpt.meta["splits"]["sites"] == []
    assert "_s0" not in json.dumps(ckpt.meta, default=str)  # no slide id (they are all "<site>_sNN")
    site = root / "cohort" / "site_2"
    data = load_site(Site("site_2", site / "features", site / "labels.csv"),
                     classes=tuple(ckpt.classes), label_col="label", val_frac=0.2, test_frac=0.3, seed=5,
                     max_instances=None)
    held_out = {r.slide_id for r in data.test.records}
    assert _evaluate(root / "fed" / "best.pt", site, root / "report") == 0
    assert _scored(root / "report") == held_out  # the slides the site's ClientApp held out in the federation
    assert "federated checkpoint cannot tell whether this site took part" in capsys.readouterr().out


def test_a_checkpoint_without_a_record_needs_a_split_column_or_split_all(pooled, tmp_path, capsys):
    model, ckpt = load_checkpoint(pooled / "run" / "model.pt")
    old = tmp_path / "old.pt"
    meta = {k: v for k, v in ckpt.meta.items() if k != "splits"}  # as checkpoints were before split records
    save_checkpoint(old, model, ckpt.classes, ckpt.provenance, meta)
    assert _evaluate(old, pooled / "b", tmp_path / "r1") == 2
    assert "does not record how its training slides were split" in capsys.readouterr().err
    assert not (tmp_path / "r1" / "metrics.json").exists()
    assert _evaluate(old, pooled / "b", tmp_path / "r2", "--split", "all") == 0

    site = tmp_path / "b"  # the same slides, with a split column filled on every row
    site.mkdir()
    (site / "features").symlink_to(pooled / "b" / "features")
    rows = list(csv.DictReader((pooled / "b" / "labels.csv").open()))
    with (site / "labels.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[*rows[0], "split"])
        writer.writeheader()
        writer.writerows({**r, "split": "test" if int(r["slide_id"][-2:]) >= 12 else "train"} for r in rows)
    assert _evaluate(old, site, tmp_path / "r3") == 0
    assert _scored(tmp_path / "r3") == {r["slide_id"] for r in rows if int(r["slide_id"][-2:]) >= 12}


def test_an_unknown_split_rule_or_a_missing_split_is_refused(pooled):
    _, ckpt = load_checkpoint(pooled / "run" / "model.pt")
    records = read_labels(pooled / "a" / "labels.csv", classes=ckpt.classes).records
    meta = {**ckpt.meta, "splits": {**ckpt.meta["splits"], "rule": "some future rule"}}
    with pytest.raises(ConfigError, match="rule this version does not know"):
        select_slides(meta, records, "test")
    meta = {**ckpt.meta, "splits": {**ckpt.meta["splits"], "test_frac": 0.0}}
    with pytest.raises(ConfigError, match="left no test split"):
        select_slides(meta, records, None)
