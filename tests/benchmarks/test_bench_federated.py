"""The federated benchmark's non-IID splits, cohorts, model names and statistics (:mod:`wsi_fl.benchmarks`).

The benchmark's figures stand on these splits: label skew must give the sites
low/medium/high positive rates, size skew small/medium/large sites, every site
both classes, and the same seed the same partition. The model names are the
results file's keys, so results stored by earlier runs keep loading.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from wsi_fl.benchmarks import cohorts, federated, results
from wsi_fl.federation.config import FedConfig
from wsi_fl.mil.fit import load_site_records


@pytest.mark.parametrize("skew", ["label", "size"])
def test_partition_is_deterministic_and_skewed(skew):
    targets = np.array([1] * 50 + [0] * 50)
    site = cohorts.partition(targets, skew, seed=3)
    assert np.array_equal(site, cohorts.partition(targets, skew, seed=3))
    assert not np.array_equal(site, cohorts.partition(targets, skew, seed=4))
    sizes = np.bincount(site, minlength=3)
    rates = [targets[site == k].mean() for k in range(3)]
    assert all(((site == k) & (targets == c)).sum() >= cohorts.MIN_PER_CLASS for k in range(3) for c in (0, 1))
    if skew == "label":
        assert rates == pytest.approx(cohorts.LABEL_SKEW_RATES, abs=0.02) and sizes.max() - sizes.min() <= 2
    else:
        assert sizes / sizes.sum() == pytest.approx(cohorts.SIZE_SKEW_SHARES, abs=0.02)
        assert rates == pytest.approx([0.5] * 3, abs=0.05)


def test_apportion_tops_up_small_classes():
    assert cohorts.apportion(7, (0.1, 0.1, 0.8)) == [2, 2, 3]
    with pytest.raises(ValueError, match="cannot give 3 sites 2 each"):
        cohorts.apportion(5, (1, 1, 1))


def test_cohort_from_a_real_mil_table(testdata, tmp_path):
    table = testdata / "mil" / "musk1.csv"
    cohort = cohorts.build_cohort(tmp_path, table, "musk1", "label", seed=0)
    assert [s.name for s in cohort.sites] == ["site_1", "site_2", "site_3"]
    pairs, classes = load_site_records(list(cohort.sites), "label", None)
    assert classes == ["0", "1"] and len(pairs) == 92  # every bag of Musk1, once
    assert len({r.slide_id for _, r in pairs}) == 92


def test_wsi_scale_bags_are_valid_feature_files(tmp_path):
    cohort = cohorts.build_cohort(tmp_path, None, "wsiscale", "size", seed=0, wsi_scale=(12, 50))
    pairs, classes = load_site_records(list(cohort.sites), "label", None)
    assert classes == ["0", "1"] and len(pairs) == 12
    stamp = (tmp_path / "wsiscale" / "bags" / ".complete.json").stat().st_mtime_ns
    cohorts.build_cohort(tmp_path, None, "wsiscale", "size", seed=1, wsi_scale=(12, 50))  # reused, not rewritten
    assert (tmp_path / "wsiscale" / "bags" / ".complete.json").stat().st_mtime_ns == stamp


def test_server_step_results_sit_beside_the_plain_ones(tmp_path):
    """One results file holds plain and stepped FedAvg: only those two strategies' names carry the step."""
    plain, auto = federated.Protocol(proximal_mu=0.01), federated.Protocol(proximal_mu=0.01, server_step=0.0)
    assert plain.fingerprint() == auto.fingerprint()  # pooled, local and other strategies' results are shared
    assert "server_step" not in plain.fingerprint() and "input_norm" not in plain.fingerprint()["model"]
    assert [auto.fed_name(s) for s in ("fedavg", "fedprox", "fedadam")] == [
        "fedavg step auto", "fedprox step auto", "fedadam"]
    assert federated.Protocol(server_step=2.5).fed_name("fedavg") == "fedavg step 2.5"
    assert plain.fed_name("fedavg") == "fedavg"
    cfg = auto.fed_config("fedavg", 0, 3, tmp_path)
    assert cfg.server_step == 0.0 and auto.fed_config("fedadam", 0, 3, tmp_path).server_step == 1.0


def test_proximal_mu_results_sit_beside_the_legacy_ones(tmp_path):
    """FedProx under another mu is its own column; stored plain 'fedprox' results keep meaning mu 0.01."""
    plain, strong = federated.Protocol(proximal_mu=0.01), federated.Protocol(proximal_mu=1.0)
    assert plain.fingerprint() == strong.fingerprint() and "proximal_mu" not in plain.fingerprint()
    assert [strong.fed_name(s) for s in ("fedavg", "fedprox", "fedadam")] == ["fedavg", "fedprox mu 1", "fedadam"]
    assert federated.Protocol().proximal_mu == FedConfig().proximal_mu == 1.0  # the benchmark runs the default
    assert plain.fed_name("fedprox") == "fedprox" and plain.fed_config("fedprox", 0, 3, tmp_path).proximal_mu == 0.01
    assert strong.fed_config("fedprox", 0, 3, tmp_path).proximal_mu == 1.0
    assert federated.Protocol(proximal_mu=1.0, server_step=0.0).fed_name("fedprox") == "fedprox mu 1 step auto"


def test_goal_lines_give_the_best_local_per_seed_and_the_best_site():
    def row(model, seed, auc):
        return {"kind": "run", "dataset": "d", "skew": "size", "model": model, "seed": seed, "auc": auc}

    rows = [row("pooled", 0, 0.90), row("pooled", 1, 0.90), row("fedavg", 0, 0.75), row("fedavg", 1, 0.75),
            row("local:site_1", 0, 0.80), row("local:site_1", 1, 0.60),
            row("local:site_2", 0, 0.60), row("local:site_2", 1, 0.80)]
    cols = results.per_seed(rows, "d", "size")
    assert cols["best local"] == {0: 0.80, 1: 0.80}
    line = results.goal_check(cols, federated.Protocol())
    assert line == ("fedavg 0.750 >= pooled 0.900 - 0.02: NO (paired fedavg - pooled, 95% CI -0.150 to -0.150); "
                    ">= best local 0.800: NO; >= best site 0.700: yes")


def test_paired_interval_is_students_t_over_the_common_seeds():
    a = {0: 0.9, 1: 0.8, 2: 0.7, 3: 0.5}
    b = {0: 0.8, 1: 0.8, 2: 0.6}  # seed 3 has no pair
    lo, hi = results.paired_interval(a, b)
    half = 4.302653 * np.std([0.1, 0.0, 0.1], ddof=1) / np.sqrt(3)  # t(0.975, 2 df)
    assert (lo, hi) == pytest.approx((0.2 / 3 - half, 0.2 / 3 + half), abs=1e-6)
    assert all(np.isnan(results.paired_interval({0: 1.0}, {0: 0.5})))


def test_a_stored_results_file_still_loads_and_resumes(tmp_path, capsys):
    """Rows written by earlier runs keep their meaning: plain 'fedprox' is mu 0.01, a line cut by a kill is skipped."""
    proto = federated.Protocol(epochs=3, proximal_mu=federated.LEGACY_MU)
    key = {"protocol": proto.fingerprint(), "dataset": "musk1", "skew": "label", "seed": 0}
    rows = [{**key, "kind": "run", "model": m, "auc": a, "epochs": 3}
            for m, a in [("pooled", 0.9), ("local:site_1", 0.7), ("local:site_2", 0.8), ("fedprox", 0.85)]]
    path = tmp_path / "results.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"kind": "run", "proto')
    store = results.Results(path)
    assert len(store.rows) == 4
    assert store.has(**key, model="fedprox") and not store.has(**key, model="fedprox mu 1")
    results.print_table(store, proto, [("musk1", "label")], [0], ["fedprox"])
    out = capsys.readouterr().out.splitlines()
    assert out[2].split() == ["dataset/skew", "pooled", "best", "local", "fedprox"]
    assert out[3].split() == ["musk1/label", "0.900", "0.800", "0.850"]
    assert out[-1].startswith("musk1/label       fedprox 0.850 >= pooled 0.900 - 0.02: NO")


def test_unseen_table_sets_the_whole_site_left_out_beside_the_seen_auc(tmp_path, capsys):
    """The unseen-site rows are result rows like any other: stored by name, printed in their own table."""
    proto = federated.Protocol(epochs=3)
    assert federated.unseen_names(proto) == ("unseen pooled", "unseen fedavg")
    key = {"protocol": proto.fingerprint(), "dataset": "realistic", "skew": "as-is", "kind": "run"}
    store = results.Results(tmp_path / "results.jsonl")
    for seed, (p, f, up, uf) in enumerate([(0.9, 0.85, 0.7, 0.6), (0.8, 0.75, 0.5, 0.4)]):
        for model, auc in [("pooled", p), ("fedavg", f), ("unseen pooled", up), ("unseen fedavg", uf)]:
            row = {**key, "seed": seed, "model": model, "auc": auc}
            if model.startswith("unseen"):
                row["per_site"] = {"site_1": {"auc": auc}, "site_2": {"auc": None}}
            store.append(row)
    federated.print_unseen_table(results.Results(tmp_path / "results.jsonl"), proto, [("realistic", "as-is")], [0, 1])
    out = capsys.readouterr().out.splitlines()
    assert out[-2].split() == ["realistic/as-is", "0.850", "±", "0.071", "0.800", "±", "0.071", "0.600", "±",
                               "0.141", "0.500", "±", "0.141"]
    assert out[-1].split() == ["site_1", "left", "out", "0.600", "±", "0.141", "0.500", "±", "0.141"]  # no site_2


def test_the_realistic_dataset_is_a_script_choice_with_a_smoke_path():
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "scripts" / "bench_federated.py"
    help_text = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True,
                               check=True).stdout
    assert "--unseen" in help_text and "--smoke" in help_text and "realistic" in help_text
    assert cohorts.REALISTIC == "realistic" and cohorts.REALISTIC_SLIDES * 0.4 >= 4  # site 3 keeps 4 slides
