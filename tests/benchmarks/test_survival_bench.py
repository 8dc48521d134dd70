"""GBSG2: the Cox loss's linear model matches lifelines' penalised Cox fit on the same folds."""

from __future__ import annotations

import pytest

from wsi_fl.benchmarks.survival import run_gbsg2_benchmark


@pytest.mark.slow
def test_gbsg2_c_index_matches_lifelines_within_002() -> None:
    out = run_gbsg2_benchmark(folds=3, penalizer=0.01, seed=0)
    assert out["n"] == 686 and out["events"] == 299
    assert abs(out["c_index"]["mean"] - out["lifelines_c_index"]["mean"]) < 0.02
    assert out["max_fold_difference"] < 0.02 and out["c_index"]["mean"] > 0.62
