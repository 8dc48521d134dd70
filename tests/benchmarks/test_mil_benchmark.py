"""The MIL benchmark protocol on the real Musk1 bag table (a reduced run: the full one is a benchmark)."""

from __future__ import annotations

import json

from wsi_fl.cli import main


def test_mil_benchmark_cli_on_musk1(mil_file, capsys):
    code = main(["mil-benchmark", "--csv", str(mil_file("musk1.csv")), "--folds", "3", "--repeats", "1",
                 "--model", "attention", "--per-fold", "--quiet"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["dataset"] == "musk1" and result["bags"] == 92 and result["folds"] == 3
    assert len(result["per_fold"]) == 3 and sum(f["n_test"] for f in result["per_fold"]) == 92
    assert result["accuracy_mean"] > 0.7 and 0.5 < result["auc_mean"] <= 1.0


def test_mil_benchmark_unknown_model(mil_file, capsys):
    assert main(["mil-benchmark", "--csv", str(mil_file("musk1.csv")), "--model", "nope"]) == 2
    assert "registered:" in capsys.readouterr().err
