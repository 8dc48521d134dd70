"""The MIL benchmark protocol on the real Musk1 bag table (a reduced run: the full one is a benchmark)."""

from __future__ import annotations

import json

import numpy as np

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


def _write_table(path, header, rows):
    path.write_text("\n".join([",".join(header), *(",".join(map(str, r)) for r in rows)]) + "\n")
    return path


def key_instance_table(path, n_bags=48, dim=4, seed=0):
    """label,bag,... with a key instance (+5 on features 0 and 1) in every positive bag."""
    rng = np.random.default_rng(seed)
    rows = []
    for b in range(n_bags):
        x = rng.normal(size=(int(rng.integers(3, 6)), dim))
        if b % 2:
            x[0, :2] += 5.0
        rows += [[b % 2, f"b{b}", *np.round(xi, 4)] for xi in x]
    return _write_table(path, ["label", "bag", *map(str, range(dim))], rows)


def survival_table(path, n_bags=60, dim=4, seed=0):
    """time,event,bag,...: a bag holding a key instance (+3 on feature 0) has 4x the hazard; ~25 % censored."""
    rng = np.random.default_rng(seed)
    rows = []
    for b in range(n_bags):
        x = rng.normal(size=(int(rng.integers(2, 5)), dim))
        key = b % 2 == 1
        if key:
            x[0, 0] += 3.0
        t_event = rng.exponential(1.0 / (4.0 if key else 1.0))
        t_cens = rng.exponential(3.0)
        t, e = min(t_event, t_cens), int(t_event <= t_cens)
        rows += [[round(t, 5), e, f"p{b}", *np.round(xi, 4)] for xi in x]
    return _write_table(path, ["time", "event", "bag", *map(str, range(dim))], rows)


def test_mil_benchmark_tune_chooses_per_outer_fold(tmp_path, monkeypatch, capsys):
    from wsi_fl.mil import tuning

    grid = tuning.TuneGrid(lr=(1e-7, 5e-3), weight_decay=(1e-4,), hidden_dim=(16,), epochs=(2, 10), inner_folds=2)
    monkeypatch.setattr(tuning, "DEFAULT_GRID", grid)  # the CLI's grid, read at call time; tiny for a test
    csv = key_instance_table(tmp_path / "keys.csv")
    code = main(["mil-benchmark", "--csv", str(csv), "--folds", "3", "--repeats", "1", "--model", "attention",
                 "--tune", "--per-fold", "--quiet"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["tuned"] is True and result["tune_grid"]["lr"] == [1e-7, 5e-3]
    assert len(result["per_fold"]) == 3
    for fold in result["per_fold"]:
        assert fold["chosen"]["lr"] == 5e-3 and fold["chosen"]["epochs"] in (2, 10)
        assert fold["best_epoch"] == fold["chosen"]["epochs"] - 1  # refit for exactly the chosen epochs
    assert result["accuracy_mean"] > 0.8


def test_mil_benchmark_survival_c_index(tmp_path, capsys):
    csv = survival_table(tmp_path / "surv.csv")
    code = main(["mil-benchmark", "--csv", str(csv), "--task", "survival", "--folds", "3", "--repeats", "2",
                 "--model", "attention", "--per-fold", "--quiet"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["task"] == "survival" and result["bags"] == 60 and "accuracy_mean" not in result
    assert len(result["per_fold"]) == 6 and all(0.0 <= f["c_index"] <= 1.0 for f in result["per_fold"])
    assert len(result["per_repeat_c_index"]) == 2 and result["c_index_std"] >= 0.0
    assert result["c_index_mean"] > 0.6  # the key instance is learnt (random risk gives 0.5)
    assert result["train_config"]["task"] == "survival" and result["train_config"]["batch_size"] == 32


def test_mil_benchmark_survival_on_a_classification_table_is_one_line(mil_file, capsys):
    code = main(["mil-benchmark", "--csv", str(mil_file("musk1.csv")), "--task", "survival", "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code != 0 and "musk1.csv" in err and "time,event,bag" in err and len(err.splitlines()) == 1
