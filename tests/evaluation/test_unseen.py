"""Leave-one-site-out validation: each site scored by pooled and federated models that never saw it."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch
from bagsites import make_cohort

from models.checkpoint import load_checkpoint
from wsi_fl.errors import ConfigError
from wsi_fl.evaluation.unseen import CSV_HEADER, UnseenResult, leave_one_site_out, subset_cohort, write_unseen_csv
from wsi_fl.federation.config import FedConfig
from wsi_fl.mil.training import TrainConfig

SITES = ["site_1", "site_2", "site_3"]


@pytest.fixture(scope="module")
def unseen(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("unseen")
    make_cohort(root / "cohort", sizes=(6, 8, 6))
    train = TrainConfig(epochs=2, lr=1e-3, early_stopping="none", seed=0)
    fed = FedConfig(num_server_rounds=2, lr=1e-3, hidden_dim=16, attn_dim=8, seed=0)
    results = leave_one_site_out(root / "cohort", root / "out", train=train, fed=fed, n_bootstrap=50)
    return root, results


@pytest.mark.slow  # one fixture: 3 folds x (pooled + a Flower federation), ~30 s on 2 cores
def test_every_site_is_scored_by_both_modes_on_all_its_slides(unseen):
    root, results = unseen
    assert [(r.held_out, r.mode) for r in results] == [(s, m) for s in SITES for m in ("pooled", "federated")]
    sizes = {"site_1": 6, "site_2": 8, "site_3": 6}
    for r in results:
        assert r.n_slides == sizes[r.held_out] and r.n_positive == sizes[r.held_out] // 2
        assert 0.0 <= r.auc <= 1.0 and r.ci is not None and r.ci[0] <= r.ci[1]
        with (root / "out" / r.held_out / r.mode / "unseen" / "predictions.csv").open() as f:
            scored = {row["slide_id"] for row in csv.DictReader(f)}
        assert scored == {f"{r.held_out}_s{i:02d}" for i in range(sizes[r.held_out])}
        metrics = json.loads((root / "out" / r.held_out / r.mode / "unseen" / "metrics.json").read_text())
        assert metrics["auc"] == pytest.approx(r.auc)


@pytest.mark.slow
def test_the_held_out_site_is_never_trained_on(unseen):
    root, _ = unseen
    for held in SITES:
        rest = [s for s in SITES if s != held]
        _, ckpt = load_checkpoint(root / "out" / held / "pooled" / "model.pt")
        assert ckpt.meta["sites"] == rest
        with (root / "out" / held / "pooled" / "splits.csv").open() as f:
            rows = list(csv.DictReader(f))
        assert {r["site"] for r in rows} == set(rest) and {r["split"] for r in rows} == {"train"}
        # the federation ran over a cohort of links to the other sites only, and every round heard from two sites
        assert sorted(p.name for p in (root / "out" / held / "cohort").iterdir()) == rest
        rounds = [json.loads(line) for line in (root / "out" / held / "federated" / "metrics.jsonl").open()]
        assert len(rounds) == 2 and all(r["sampled"] == 2 and r["aggregated"] == 2 for r in rounds)
        assert all(r["val-n"] == 0 and r["test-n"] == 0 for r in rounds)  # every slide of the sites trains


@pytest.mark.slow
def test_the_csv_has_one_row_per_site_and_mode(unseen):
    root, results = unseen
    with (root / "out" / "unseen.csv").open() as f:
        rows = list(csv.reader(f))
    assert tuple(rows[0]) == CSV_HEADER and len(rows) == 1 + len(results)
    assert rows[1][:2] == ["site_1", "pooled"] and float(rows[1][2]) == pytest.approx(results[0].auc, abs=1e-4)


def test_csv_leaves_an_undefined_auc_and_interval_empty(tmp_path):
    write_unseen_csv([UnseenResult("s", "pooled", math.nan, None, 3, 0)], tmp_path / "u.csv")
    assert (tmp_path / "u.csv").read_text().splitlines()[1] == "s,pooled,,,,3,0"


def test_bad_sites_and_modes_are_one_line_errors(tmp_path):
    make_cohort(tmp_path / "cohort", sizes=(4, 4))
    kw = {"train": TrainConfig(epochs=1), "fed": FedConfig()}
    with pytest.raises(ConfigError, match="no site 'site_9'"):
        leave_one_site_out(tmp_path / "cohort", tmp_path / "out", sites=["site_9"], **kw)
    with pytest.raises(ConfigError, match="modes must be among pooled, federated, not local"):
        leave_one_site_out(tmp_path / "cohort", tmp_path / "out", modes=["local"], **kw)
    with pytest.raises(ConfigError, match="not a site directory"):
        subset_cohort(tmp_path / "cohort", ["nope"], tmp_path / "sub")
