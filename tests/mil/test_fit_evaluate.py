"""Pooled/local training, checkpoint provenance and the evaluation report, on small real HDF5 bags."""

from __future__ import annotations

import csv
import json
import logging

import pytest
from bagsites import DIM, _attrs, make_site

from preprocessing.h5format import FeatureWriter
from wsi_fl.cli import main
from wsi_fl.evaluation.options import EvalOptions
from wsi_fl.mil.fit import fit
from wsi_fl.mil.training import TrainConfig

FAST = TrainConfig(epochs=15, lr=1e-3, patience=15, seed=0)


def test_pooled_training_learns_and_writes_everything(tmp_path):
    sites = [make_site(tmp_path, f"site_{k}", 16, seed=k) for k in range(3)]
    result = fit(sites, tmp_path / "run", train=FAST, progress=False)
    assert result.test_metrics["auc"] >= 0.9
    for name in ("model.pt", "splits.csv", "history.csv", "test/metrics.json", "test/predictions.csv",
                 "test/roc.png", "test/calibration.png"):
        assert (tmp_path / "run" / name).stat().st_size > 0, name
    with open(tmp_path / "run" / "splits.csv") as f:
        rows = list(csv.DictReader(f))
    by_patient: dict[str, set[str]] = {}
    for r in rows:
        by_patient.setdefault(r["patient_id"], set()).add(r["split"])
    assert all(len(s) == 1 for s in by_patient.values())  # no patient in two splits
    assert {r["patient_id"].split(":")[0] for r in rows} == {"site_0", "site_1", "site_2"}  # site-unique ids


def test_evaluate_cli_report_and_provenance_refusal(tmp_path, capsys):
    train_site = make_site(tmp_path, "a", 16, seed=1)
    fit([train_site], tmp_path / "run", train=FAST, test_frac=0.0, progress=False)
    other = make_site(tmp_path, "b", 8, seed=2)
    out = tmp_path / "eval"
    code = main(["evaluate", "--model", str(tmp_path / "run" / "model.pt"), "--features", str(other.features_dir),
                 "--labels", str(other.labels), "--out", str(out), "--bootstrap", "100", "--heatmap-top-k", "2",
                 "--split", "all"])  # another cohort: every slide
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["evaluated"]["split"] == "all" and metrics["evaluated"]["held_out"] is False
    assert metrics["n"] == 8 and 0 <= metrics["auc"] <= 1 and len(metrics["auc_ci95"]) == 2
    assert {"brier", "calibration", "sensitivity", "specificity", "confusion_matrix"} <= set(metrics)
    with open(out / "predictions.csv") as f:
        preds = list(csv.DictReader(f))
    assert len(preds) == 8 and {"prob_0", "prob_1", "predicted"} <= set(preds[0])
    geo = sorted((out / "heatmaps").glob("*.geojson"))
    assert len(geo) == 2  # slide files absent: GeoJSON still written, image skipped with a message
    assert "not found" in capsys.readouterr().out

    foreign = make_site(tmp_path, "c", 4, seed=3, encoder="enc-b", tile_size=256)
    code = main(["evaluate", "--model", str(tmp_path / "run" / "model.pt"), "--features", str(foreign.features_dir),
                 "--labels", str(foreign.labels), "--out", str(tmp_path / "e2")])
    err = capsys.readouterr().err
    assert code == 2 and "encoder" in err and "tile_size" in err and "enc-b" in err
    assert not (tmp_path / "e2" / "metrics.json").exists()


def test_sites_with_different_feature_spaces_refused(tmp_path):
    sites = [make_site(tmp_path, "a", 8, seed=1), make_site(tmp_path, "b", 8, seed=2, encoder="enc-b")]
    with pytest.raises(ValueError, match="encoder"):
        fit(sites, tmp_path / "run", train=FAST, progress=False)


def test_train_cli_local_with_predefined_splits(tmp_path, capsys):
    site = make_site(tmp_path, "a", 12, seed=4)
    rows = list(csv.reader(site.labels.open()))
    split = {f"p{k}": s for k, s in zip(range(12), ["train"] * 6 + ["val"] * 3 + ["test"] * 3, strict=True)}
    with site.labels.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow([*rows[0], "split"])
        for slide_id, label, patient in rows[1:]:
            w.writerow([slide_id, label, patient, "train" if patient in ("p0", "p1") else split[patient]])
    code = main(["train", "--features", str(site.features_dir), "--labels", str(site.labels), "--out",
                 str(tmp_path / "run"), "--epochs", "3", "--model", "clam_sb", "--quiet"])
    assert code == 0, capsys.readouterr().err
    with open(tmp_path / "run" / "splits.csv") as f:
        got = {r["slide_id"]: r["split"] for r in csv.DictReader(f)}
    assert got["a_s00"] == "train" and got["a_s11"] == "test"
    assert "test:" in capsys.readouterr().out


def test_train_cli_usage_errors(tmp_path, capsys):
    assert main(["train", "--out", str(tmp_path)]) == 2
    site = make_site(tmp_path, "a", 4, seed=0)
    assert main(["train", "--features", str(site.features_dir), "--labels", str(site.labels), "--out",
                 str(tmp_path / "r"), "--model", "nope", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "--site" in err and "nope" in err


def test_a_labelled_slide_without_tiles_is_left_out_with_a_message(tmp_path, caplog):
    """A slide preprocessing found empty (a feature file of zero tiles) no longer stops training later."""
    site = make_site(tmp_path, "a", 12, seed=4)
    with FeatureWriter(site.features_dir / "blank.h5", DIM, _attrs("blank")) as writer:
        writer.commit()
    site.labels.write_text(site.labels.read_text() + "blank,1,p99\n")
    with caplog.at_level(logging.WARNING, logger="wsi_fl.mil"):
        result = fit([site], tmp_path / "run", train=TrainConfig(epochs=1, seed=0),
                     eval_opts=EvalOptions(n_bootstrap=10), progress=False)
    assert "slide blank left out: its feature file has no tiles (preprocessing status empty)" in caplog.text
    with open(tmp_path / "run" / "splits.csv") as f:
        assert "blank" not in {r["slide_id"] for r in csv.DictReader(f)}
    assert sum(result.split_sizes.values()) == 12
