"""``wsi-fl train --task survival`` and ``wsi-fl evaluate`` of a survival checkpoint, end to end on small real
HDF5 bags; bad survival labels as one-line errors naming the file."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from survsites import make_survival_site

from models.checkpoint import load_checkpoint
from wsi_fl.cli import main
from wsi_fl.evaluation.options import EvalOptions
from wsi_fl.evaluation.survival import harrell_c
from wsi_fl.mil.fit import fit
from wsi_fl.mil.training import TrainConfig

FAST = dict(epochs=12, lr=1e-3, patience=12, seed=0, task="survival", batch_size=16)


@pytest.mark.slow
def test_pooled_cox_training_report_and_evaluate_agree(tmp_path: Path, capsys) -> None:
    sites = [make_survival_site(tmp_path, f"site_{k}", 30, seed=k) for k in range(2)]
    result = fit(sites, tmp_path / "run", train=TrainConfig(**FAST), eval_opts=EvalOptions(n_bootstrap=50),
                 test_frac=0.3, progress=False)
    m = result.test_metrics
    assert m["task"] == "survival" and m["n"] == result.split_sizes["test"]
    assert 0.6 <= m["c_index"] <= 1 and len(m["c_index_ci95"]) == 2 and 0 <= m["uno_c_index"] <= 1
    assert m["horizons"] and set(m["time_auc"]) and 0 < m["integrated_brier_score"] < 0.5
    assert m["risk_groups"]["logrank"]["p_value"] >= 0
    for name in ("model.pt", "splits.csv", "history.csv", "test/metrics.json", "test/predictions.csv",
                 "test/km.png", "test/time_auc.png"):
        assert (tmp_path / "run" / name).stat().st_size > 0, name
    _, ckpt = load_checkpoint(tmp_path / "run" / "model.pt")
    info = ckpt.meta["survival"]
    assert ckpt.meta["task"] == "survival" and info["loss"] == "cox"
    assert len(info["train_time"]) == result.split_sizes["train"]
    with open(tmp_path / "run" / "test" / "predictions.csv") as f:
        preds = list(csv.DictReader(f))
    risk = np.array([float(r["risk"]) for r in preds])
    assert harrell_c([float(r["time"]) for r in preds], [int(r["event"]) for r in preds], risk) == m["c_index"]

    # wsi-fl evaluate redraws each site's test split and scores it with the checkpoint's training reference
    with open(tmp_path / "run" / "splits.csv") as f:
        test_ids = {r["slide_id"] for r in csv.DictReader(f) if r["site"] == "site_1" and r["split"] == "test"}
    out = tmp_path / "eval"
    code = main(["evaluate", "--model", str(tmp_path / "run" / "model.pt"), "--features",
                 str(sites[1].features_dir), "--labels", str(sites[1].labels), "--out", str(out), "--bootstrap", "20"])
    assert code == 0
    printed = capsys.readouterr().out
    assert '"c_index"' in printed and "scored the test split" in printed
    em = json.loads((out / "metrics.json").read_text())
    with open(out / "predictions.csv") as f:
        scored = {r["slide_id"]: float(r["risk"]) for r in csv.DictReader(f)}
    assert set(scored) == test_ids and em["evaluated"]["held_out"] and (out / "km.png").stat().st_size > 0
    by_id = {r["slide_id"]: float(r["risk"]) for r in preds}
    assert all(scored[s] == pytest.approx(by_id[s], abs=1e-5) for s in test_ids)  # same model, same risks


@pytest.mark.slow
def test_train_cli_discrete_survival_with_renamed_columns(tmp_path: Path, capsys) -> None:
    site = make_survival_site(tmp_path, "a", 30, seed=5)
    rows = list(csv.reader(site.labels.open()))
    rows[0] = ["slide_id", "os_months", "death", "patient_id"]
    with site.labels.open("w", newline="") as f:
        csv.writer(f).writerows(rows)
    code = main(["train", "--task", "survival", "--survival-loss", "discrete", "--time-bins", "3",
                 "--time-col", "os_months", "--event-col", "death", "--features", str(site.features_dir),
                 "--labels", str(site.labels), "--out", str(tmp_path / "run"), "--epochs", "4", "--quiet",
                 "--bootstrap", "20"])
    out = capsys.readouterr().out
    assert code == 0 and '"c_index"' in out and "integrated_brier_score" in out
    _, ckpt = load_checkpoint(tmp_path / "run" / "model.pt")
    assert ckpt.config.n_classes == 3 and len(ckpt.meta["survival"]["bin_edges"]) == 4
    assert ckpt.classes == ["bin0", "bin1", "bin2"]


@pytest.mark.parametrize(("header", "row", "message"), [
    ("slide_id,time,event,patient_id", "{s},-2,1,p", "time must be a finite number >= 0, not -2"),
    ("slide_id,time,event,patient_id", "{s},3,yes,p", "event must be 0 (censored) or 1 (event), not 'yes'"),
    ("slide_id,time,patient_id", "{s},3,p", "missing column(s) event"),
])
def test_bad_survival_labels_fail_train_in_one_line(tmp_path: Path, capsys, header: str, row: str,
                                                    message: str) -> None:
    site = make_survival_site(tmp_path, "a", 4, seed=1)
    lines = site.labels.read_text().splitlines()
    bad_first = row.format(s=lines[1].split(",")[0])
    keep = lines[2:] if "event" in header else [",".join(v for k, v in enumerate(r.split(",")) if k != 2)
                                                for r in lines[2:]]
    site.labels.write_text("\n".join([header, bad_first, *keep]) + "\n")
    code = main(["train", "--task", "survival", "--batch-size", "4", "--features", str(site.features_dir),
                 "--labels", str(site.labels), "--out", str(tmp_path / "run"), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and str(site.labels) in err and len(err.splitlines()) == 1
    assert not (tmp_path / "run" / "model.pt").exists()
