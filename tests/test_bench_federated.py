"""The federated benchmark's non-IID splits and cohorts (scripts/bench_federated.py), on the real MIL tables.

The benchmark's figures stand on these splits: label skew must give the sites
low/medium/high positive rates, size skew small/medium/large sites, every site
both classes, and the same seed the same partition.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

from wsi_fl.federation.config import FedConfig
from wsi_fl.mil.fit import load_site_records

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(ROOT / "scripts"))  # the script imports run_local_federation beside it
    try:
        spec = importlib.util.spec_from_file_location("bench_federated", ROOT / "scripts" / "bench_federated.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # its dataclasses look their module up there
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop("bench_federated", None)
        sys.path.remove(str(ROOT / "scripts"))


@pytest.mark.parametrize("skew", ["label", "size"])
def test_partition_is_deterministic_and_skewed(bench, skew):
    targets = np.array([1] * 50 + [0] * 50)
    site = bench.partition(targets, skew, seed=3)
    assert np.array_equal(site, bench.partition(targets, skew, seed=3))
    assert not np.array_equal(site, bench.partition(targets, skew, seed=4))
    sizes = np.bincount(site, minlength=3)
    rates = [targets[site == k].mean() for k in range(3)]
    assert all(((site == k) & (targets == c)).sum() >= bench.MIN_PER_CLASS for k in range(3) for c in (0, 1))
    if skew == "label":
        assert rates == pytest.approx(bench.LABEL_SKEW_RATES, abs=0.02) and sizes.max() - sizes.min() <= 2
    else:
        assert sizes / sizes.sum() == pytest.approx(bench.SIZE_SKEW_SHARES, abs=0.02)
        assert rates == pytest.approx([0.5] * 3, abs=0.05)


def test_apportion_tops_up_small_classes(bench):
    assert bench.apportion(7, (0.1, 0.1, 0.8)) == [2, 2, 3]
    with pytest.raises(ValueError, match="cannot give 3 sites 2 each"):
        bench.apportion(5, (1, 1, 1))


def test_cohort_from_a_real_mil_table(bench, testdata, tmp_path):
    table = testdata / "mil" / "musk1.csv"
    cohort = bench.build_cohort(tmp_path, table, "musk1", "label", seed=0)
    assert [s.name for s in cohort.sites] == ["site_1", "site_2", "site_3"]
    pairs, classes = load_site_records(list(cohort.sites), "label", None)
    assert classes == ["0", "1"] and len(pairs) == 92  # every bag of Musk1, once
    assert len({r.slide_id for _, r in pairs}) == 92


def test_wsi_scale_bags_are_valid_feature_files(bench, tmp_path):
    cohort = bench.build_cohort(tmp_path, None, "wsiscale", "size", seed=0, wsi_scale=(12, 50))
    pairs, classes = load_site_records(list(cohort.sites), "label", None)
    assert classes == ["0", "1"] and len(pairs) == 12
    stamp = (tmp_path / "wsiscale" / "bags" / ".complete.json").stat().st_mtime_ns
    bench.build_cohort(tmp_path, None, "wsiscale", "size", seed=1, wsi_scale=(12, 50))  # reused, not rewritten
    assert (tmp_path / "wsiscale" / "bags" / ".complete.json").stat().st_mtime_ns == stamp


def test_server_step_results_sit_beside_the_plain_ones(bench, tmp_path):
    """One results file holds plain and stepped FedAvg: only those two strategies' names carry the step."""
    plain, auto = bench.Protocol(proximal_mu=0.01), bench.Protocol(proximal_mu=0.01, server_step=0.0)
    assert plain.fingerprint() == auto.fingerprint()  # pooled, local and other strategies' results are shared
    assert "server_step" not in plain.fingerprint() and "input_norm" not in plain.fingerprint()["model"]
    assert [auto.fed_name(s) for s in ("fedavg", "fedprox", "fedadam")] == [
        "fedavg step auto", "fedprox step auto", "fedadam"]
    assert bench.Protocol(server_step=2.5).fed_name("fedavg") == "fedavg step 2.5"
    assert plain.fed_name("fedavg") == "fedavg"
    cfg = auto.fed_config("fedavg", 0, 3, tmp_path)
    assert cfg.server_step == 0.0 and auto.fed_config("fedadam", 0, 3, tmp_path).server_step == 1.0


def test_proximal_mu_results_sit_beside_the_legacy_ones(bench, tmp_path):
    """FedProx under another mu is its own column; stored plain 'fedprox' results keep meaning mu 0.01."""
    plain, strong = bench.Protocol(proximal_mu=0.01), bench.Protocol(proximal_mu=1.0)
    assert plain.fingerprint() == strong.fingerprint() and "proximal_mu" not in plain.fingerprint()
    assert [strong.fed_name(s) for s in ("fedavg", "fedprox", "fedadam")] == ["fedavg", "fedprox mu 1", "fedadam"]
    assert bench.Protocol().proximal_mu == FedConfig().proximal_mu == 1.0  # the benchmark runs the product's default
    assert plain.fed_name("fedprox") == "fedprox" and plain.fed_config("fedprox", 0, 3, tmp_path).proximal_mu == 0.01
    assert strong.fed_config("fedprox", 0, 3, tmp_path).proximal_mu == 1.0
    assert bench.Protocol(proximal_mu=1.0, server_step=0.0).fed_name("fedprox") == "fedprox mu 1 step auto"


def test_goal_lines_give_the_best_local_per_seed_and_the_best_site(bench):
    def row(model, seed, auc):
        return {"kind": "run", "dataset": "d", "skew": "size", "model": model, "seed": seed, "auc": auc}

    rows = [row("pooled", 0, 0.90), row("pooled", 1, 0.90), row("fedavg", 0, 0.75), row("fedavg", 1, 0.75),
            row("local:site_1", 0, 0.80), row("local:site_1", 1, 0.60),
            row("local:site_2", 0, 0.60), row("local:site_2", 1, 0.80)]
    cols = bench.per_seed(rows, "d", "size")
    assert cols["best local"] == {0: 0.80, 1: 0.80}
    line = bench.goal_check(cols, bench.Protocol())
    assert line == ("fedavg 0.750 >= pooled 0.900 - 0.02: NO (paired fedavg - pooled, 95% CI -0.150 to -0.150); "
                    ">= best local 0.800: NO; >= best site 0.700: yes")


def test_paired_interval_is_students_t_over_the_common_seeds(bench):
    a = {0: 0.9, 1: 0.8, 2: 0.7, 3: 0.5}
    b = {0: 0.8, 1: 0.8, 2: 0.6}  # seed 3 has no pair
    lo, hi = bench.paired_interval(a, b)
    half = 4.302653 * np.std([0.1, 0.0, 0.1], ddof=1) / np.sqrt(3)  # t(0.975, 2 df)
    assert (lo, hi) == pytest.approx((0.2 / 3 - half, 0.2 / 3 + half), abs=1e-6)
    assert all(np.isnan(bench.paired_interval({0: 1.0}, {0: 0.5})))
