"""Federated training: the real ClientApp and ServerApp on small real HDF5 sites.

Most tests deliver messages with the in-process grid of :mod:`wsi_fl.engines.inline` (fast);
``test_simulation_engine_end_to_end`` runs Flower's simulation engine and
``tests/scenarios/test_deployment.py`` the deployment engine.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import replace
from pathlib import Path
from typing import get_args

import numpy as np
import pytest
import tomllib
import torch
from bagsites import grid_for, history, make_site
from flwr.app import Array, ArrayRecord, ConfigRecord, MessageType
from sklearn.metrics import roc_auc_score

import wsi_fl
from models import MILConfig
from models.checkpoint import load_checkpoint
from models.config import INPUT_NORMS
from wsi_fl.cli import main
from wsi_fl.engines.inline import InlineGrid
from wsi_fl.federation import arrays as fedarrays
from wsi_fl.federation.config import MODEL_FIELDS, FedConfig, InputNorm
from wsi_fl.federation.histograms import histogram_auc, score_histograms
from wsi_fl.server.loop import FederationError, client_config, run_server
from wsi_fl.server.strategies import list_strategies
from wsi_fl.site.app import CLIENT_KEYS, make_client_app
from wsi_fl.site.data import discover_cohort, load_site

ROOT = Path(__file__).resolve().parents[2]
SMALL = {"hidden_dim": 32, "attn_dim": 16, "lr": 2e-3, "test_frac": 0.3, "val_frac": 0.2, "min_available_nodes": 3}



def fed(tmp_path: Path, name: str = "run", **kw) -> FedConfig:
    return FedConfig(**{**SMALL, "num_server_rounds": 3, "out_dir": str(tmp_path / name), **kw})



# -- configuration -----------------------------------------------------------------------------------------------

def test_pyproject_run_config_is_fedconfig():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["tool"]["flwr"]["app"]["config"] == FedConfig().to_run_config()
    assert FedConfig.from_run_config(project["tool"]["flwr"]["app"]["config"]) == FedConfig()
    assert project["project"]["version"] == wsi_fl.__version__


def test_fedconfig_model_fields_reach_the_sites_model():
    """Every MILConfig field a federation chooses is sent to the sites and builds their model."""
    cfg = FedConfig(model="mean", hidden_dim=24, attn_dim=12, dropout=0.1, input_norm="slide")
    sent = FedConfig.from_run_config({k: v for k, v in cfg.to_run_config().items() if k in CLIENT_KEYS})
    assert sent.mil_config(16, 2) == MILConfig(model="mean", in_dim=16, hidden_dim=24, attn_dim=12, dropout=0.1,
                                               input_norm="slide")
    assert get_args(InputNorm) == INPUT_NORMS


def test_model_fields_cover_every_milconfig_field_a_federation_can_choose():
    """A MILConfig field added later fails here until it is either federated (MODEL_FIELDS) or left out on purpose."""
    not_federated = {"in_dim", "n_classes", "k_sample", "inst_weight",  # from the sites' data; CLAM defaults
                     "n_extreme", "n_heads"}  # chowder/transmil defaults until a federation chooses them (issue 20)
    milconfig_fields = {f.name for f in dataclasses.fields(MILConfig)}
    assert set(MODEL_FIELDS) == milconfig_fields - not_federated
    assert set(MODEL_FIELDS) <= {f.name for f in dataclasses.fields(FedConfig)}
    mil = MILConfig(model="mean", in_dim=16, hidden_dim=24, attn_dim=12, dropout=0.1, input_norm="slide")
    assert FedConfig(**FedConfig.model_fields(mil)).mil_config(16, 2) == mil


@pytest.mark.parametrize(("config", "message"), [
    ({"local-epoch": 2}, "unknown run config keys: local-epoch"),
    ({"strategy": "fedsgd"}, "strategy must be one of"),
    ({"num-server-rounds": 0}, "num-server-rounds must be >= 1"),
    ({"lr": "fast"}, "lr must be float"),
])
def test_bad_run_config_is_a_one_line_error(config, message):
    with pytest.raises(ValueError, match=message):
        FedConfig.from_run_config(config)


# -- federated AUC -------------------------------------------------------------------------------------------------

def test_histogram_auc_equals_pooled_sklearn_auc():
    rng = np.random.default_rng(0)
    sites = []
    for n in (30, 50, 70):
        y = rng.integers(0, 2, n)
        p1 = np.clip(rng.normal(0.35 + 0.3 * y, 0.2), 0, 1)
        sites.append((y, np.stack([1 - p1, p1], axis=1)))
    y_all = np.concatenate([y for y, _ in sites])
    p_all = np.concatenate([p for _, p in sites])
    hist = sum(score_histograms(y, p, bins=1000) for y, p in sites)
    assert histogram_auc(hist) == pytest.approx(roc_auc_score(y_all, p_all[:, 1]), abs=2e-3)
    coarse = sum(score_histograms(y, p, bins=20) for y, p in sites)
    assert histogram_auc(coarse) == pytest.approx(roc_auc_score(y_all, p_all[:, 1]), abs=0.02)
    # Scores that no bin mixes give exactly sklearn's value.
    y = np.array([0, 0, 1, 1, 0, 1])
    p1 = np.array([0.05, 0.22, 0.61, 0.93, 0.71, 0.38])
    exact = histogram_auc(score_histograms(y, np.stack([1 - p1, p1], 1), 10))
    assert exact == pytest.approx(roc_auc_score(y, p1), abs=1e-12)


def test_histogram_auc_multiclass_is_macro_ovr():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 3, 200)
    logits = rng.normal(size=(200, 3)) + 1.5 * np.eye(3)[y]
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    ref = roc_auc_score(y, p, multi_class="ovr", average="macro")
    assert histogram_auc(score_histograms(y, p, 2000)) == pytest.approx(ref, abs=2e-3)


# -- what a site sends -------------------------------------------------------------------------------------------

def test_update_screening_rejects_broken_and_poisoned_updates():
    ref = fedarrays.to_record({"w": torch.zeros(3, 2), "b": torch.zeros(3)})
    ok = fedarrays.to_record({"w": torch.ones(3, 2), "b": torch.ones(3)})
    assert fedarrays.check_update(ok, ref, "float32") is None
    half = fedarrays.to_record({"w": torch.ones(3, 2), "b": torch.ones(3)}, "float16")
    assert fedarrays.check_update(half, ref, "float16") is None
    assert "dtype float16" in fedarrays.check_update(half, ref, "float32")
    nan = fedarrays.to_record({"w": torch.full((3, 2), float("nan")), "b": torch.ones(3)})
    assert "NaN or Inf" in fedarrays.check_update(nan, ref, "float32")
    inf = fedarrays.to_record({"w": torch.ones(3, 2), "b": torch.tensor([1.0, float("inf"), 0.0])})
    assert "NaN or Inf" in fedarrays.check_update(inf, ref, "float32")
    shape = fedarrays.to_record({"w": torch.ones(2, 3), "b": torch.ones(3)})
    assert "shape (2, 3)" in fedarrays.check_update(shape, ref, "float32")
    missing = fedarrays.to_record({"w": torch.ones(3, 2)})
    assert "missing" in fedarrays.check_update(missing, ref, "float32")
    ints = ArrayRecord({"w": Array(np.ones((3, 2), np.int64)), "b": Array(np.ones(3, np.float32))})
    assert "dtype int64" in fedarrays.check_update(ints, ref, "float32")
    for bad in (0, -3, float("nan"), "12", True):
        assert fedarrays.check_weight(bad) is not None
    assert fedarrays.check_weight(12) is None


def test_client_app_replies_hold_only_weights_and_aggregates(cohort, tmp_path):
    """Direct calls: every reply is model arrays plus scalar or count metrics; nothing names a slide or patient."""
    grid = grid_for(cohort)  # sets Flower's task identity for message creation
    cfg = fed(tmp_path)
    run_server(grid, FedConfig(**{**cfg.__dict__, "num_server_rounds": 1}))
    assert grid.sent, "the ClientApps replied"
    forbidden = ["site_", "p0", "p1", ".h5", "labels.csv", str(cohort)]
    for reply in grid.sent:
        assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
        content = reply.content
        for record in content.metric_records.values():
            for key, value in record.items():
                assert isinstance(value, int | float) or all(isinstance(v, int | float) for v in value)
                assert not any(f in key for f in forbidden)
        for record in content.config_records.values():  # only the query reply: dims, classes, provenance
            assert set(record.keys()) == {"feature-dim", "classes", "provenance", "n-train"}
            assert not any(f in json.dumps(dict(record.items())) for f in forbidden)
        for record in content.array_records.values():
            assert set(record.keys()) == set(torch.load(tmp_path / "run" / "last.pt", weights_only=False)
                                             ["state_dict"].keys())
    scored = [r for r in grid.sent if "test-hist" in r.content.metric_records.get("metrics", {})]
    assert scored and all(sum(r.content["metrics"]["test-hist"]) == r.content["metrics"]["test-n"] * 1
                          for r in scored)


def test_client_keeps_optimizer_state_across_rounds(cohort, tmp_path):
    grid = grid_for(cohort)
    run_server(grid, fed(tmp_path, num_server_rounds=2))
    state = grid.contexts[1].state
    assert "wsi-fl.optimizer" in state
    steps = [v.numpy() for k, v in state["wsi-fl.optimizer"].items() if k.endswith(".step")]
    n_train = next(r for r in grid.sent if "info" in r.content.config_records)  # site 1's query reply
    assert steps and all(float(s) == 2 * n_train.content["info"]["n-train"] for s in steps)  # 2 rounds x bags


# -- server: rounds, outputs, faults, resume ---------------------------------------------------------------------

def test_federation_trains_and_writes_checkpoints_evaluate_accepts(cohort, tmp_path, capsys):
    result = run_server(grid_for(cohort), fed(tmp_path, num_server_rounds=8))
    out = tmp_path / "run"
    rows = history(out)
    assert [r["round"] for r in rows] == list(range(1, 9)) and result.rounds_completed == 8
    assert all(r["aggregated"] == 3 and r["failed"] == 0 and r["rejected"] == 0 for r in rows)
    assert rows[-1]["val-loss"] < rows[0]["val-loss"]
    assert rows[-1]["test-auc"] >= 0.8
    expected = [load_site(s, classes=("0", "1"), label_col="label", val_frac=0.2, test_frac=0.3, seed=0,
                          max_instances=None) for s in discover_cohort(cohort)]
    assert rows[-1]["test-n"] == sum(len(d.test) for d in expected)  # every site's held-out slides, counted once
    assert rows[-1]["val-n"] == sum(len(d.val) for d in expected)
    for name in ("best.pt", "last.pt", "metrics.png", "state.pt"):
        assert (out / name).is_file()
    _, ckpt = load_checkpoint(out / "last.pt")
    assert ckpt.meta["mode"] == "federated" and ckpt.meta["round"] == 8 and ckpt.classes == ["0", "1"]
    assert ckpt.provenance["encoder"] == "enc-a"
    site = cohort / "site_3"
    code = main(["evaluate", "--model", str(out / "best.pt"), "--features", str(site / "features"),
                 "--labels", str(site / "labels.csv"), "--out", str(tmp_path / "eval"), "--bootstrap", "50"])
    assert code == 0
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())  # the site's held-out slides only
    assert metrics["n"] == len(expected[2].test) < 14 and metrics["evaluated"]["slides_given"] == 14


def test_crashed_and_silent_sites_do_not_stop_the_round(cohort, tmp_path):
    def silent(reply, rnd):
        return None if rnd >= 2 and reply.metadata.message_type == MessageType.TRAIN else reply

    grid = grid_for(cohort, faults={3: silent})
    original = grid.client_app

    class Crashing:
        def __call__(self, msg, context):
            if context.node_id == 2 and msg.content["config"].get("server-round", 0) == 2 \
                    and msg.metadata.message_type == MessageType.TRAIN:
                raise RuntimeError("disk unplugged")
            return original(msg, context)

    grid.client_app = Crashing()
    run_server(grid, fed(tmp_path, num_server_rounds=3, min_train_nodes=1))
    rows = history(tmp_path / "run")
    assert rows[0]["aggregated"] == 3
    assert rows[1]["failed"] == 1 and rows[1]["replies"] == 2 and rows[1]["aggregated"] == 1
    assert rows[2]["replies"] == 2 and rows[2]["aggregated"] == 2  # node 3 silent: the round goes on


def test_a_site_that_leaves_for_good_does_not_block_the_rounds(cohort, tmp_path):
    """Flower's strategies wait without limit for min-available-nodes: a departed site used to hang the run."""
    grid = grid_for(cohort)

    def leave_after_round_1(reply, rnd):
        if rnd == 1 and reply.metadata.message_type == MessageType.EVALUATE:
            grid.disconnect(3)
        return reply

    grid.faults = {3: leave_after_round_1}
    run_server(grid, fed(tmp_path, num_server_rounds=3, min_available_nodes=3, min_train_nodes=2,
                         min_evaluate_nodes=2))
    rows = history(tmp_path / "run")
    assert [r["sampled"] for r in rows] == [3, 2, 2]
    assert [r["aggregated"] for r in rows] == [3, 2, 2] and [r["eval-replies"] for r in rows] == [3, 2, 2]


def test_too_few_sites_left_stops_with_a_resumable_error(cohort, tmp_path):
    grid = grid_for(cohort)
    grid.faults = {3: lambda reply, rnd: (grid.disconnect(3) if rnd == 1 else None) or reply}
    cfg = fed(tmp_path, num_server_rounds=3, min_train_nodes=3, min_evaluate_nodes=2, round_timeout=1.0)
    with pytest.raises(FederationError, match=r"round 2: 2 site\(s\) connected, 3 needed.*resume=true"):
        run_server(grid, cfg)
    assert [r["round"] for r in history(tmp_path / "run")] == [1]
    grid.offline.clear()  # the site is back: the run continues from round 1
    result = run_server(grid, replace(cfg, resume=True))
    assert result.rounds_completed == 3 and [r["round"] for r in result.history] == [1, 2, 3]


def test_too_few_replies_keep_the_global_model(cohort, tmp_path):
    grid = grid_for(cohort, faults={2: lambda r, rnd: None if rnd == 2 else r,
                                    3: lambda r, rnd: None if rnd == 2 else r})
    run_server(grid, fed(tmp_path, num_server_rounds=2, min_train_nodes=2))
    rows = history(tmp_path / "run")
    assert rows[1]["aggregated"] == 0 and rows[1]["replies"] == 1


def test_poisoned_update_is_rejected_and_never_aggregated(cohort, tmp_path):
    def poison(reply, rnd):
        if reply.metadata.message_type != MessageType.TRAIN:
            return reply
        arrays = reply.content["arrays"]
        name = next(iter(arrays.keys()))
        bad = arrays[name].numpy().copy()
        bad.flat[0] = np.nan
        arrays[name] = Array(bad)
        return reply

    def smuggle(reply, rnd):  # an extra metric (a per-slide score, say) is not an aggregate the server expects
        if reply.metadata.message_type == MessageType.TRAIN:
            reply.content["metrics"]["slide-score"] = 0.93
        return reply

    run_server(grid_for(cohort, faults={2: poison, 3: smuggle}), fed(tmp_path, num_server_rounds=2,
                                                                     min_train_nodes=1))
    rows = history(tmp_path / "run")
    assert all(r["rejected"] == 2 and r["aggregated"] == 1 for r in rows)
    model, _ = load_checkpoint(tmp_path / "run" / "last.pt")
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_resumed_server_continues_from_last_round(cohort, tmp_path):
    full_grid = grid_for(cohort)
    run_server(full_grid, fed(tmp_path, "full", num_server_rounds=4, strategy="fedadam"))
    grid = grid_for(cohort)  # the SuperNodes (and their optimizer state) live on while the server restarts
    run_server(grid, fed(tmp_path, "resumed", num_server_rounds=2, strategy="fedadam"))
    result = run_server(grid, fed(tmp_path, "resumed", num_server_rounds=4, strategy="fedadam", resume=True))
    assert result.rounds_completed == 4
    assert [r["round"] for r in history(tmp_path / "resumed")] == [1, 2, 3, 4]
    full, _ = load_checkpoint(tmp_path / "full" / "last.pt")
    resumed, _ = load_checkpoint(tmp_path / "resumed" / "last.pt")
    for a, b in zip(full.state_dict().values(), resumed.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b)
    with pytest.raises(FederationError, match=r"cannot resume.*strategy"):
        run_server(grid, fed(tmp_path, "resumed", num_server_rounds=5, strategy="fedavg", resume=True))
    with pytest.raises(FederationError, match=r"cannot resume.*input-norm: 'none' -> 'slide'"):
        run_server(grid, fed(tmp_path, "resumed", num_server_rounds=5, strategy="fedadam", input_norm="slide",
                             resume=True))
    # A state saved before a key existed (here input-norm) resumes as if the key had its default.
    state_path = tmp_path / "resumed" / "state.pt"
    state = torch.load(state_path, weights_only=False)
    del state["config"]["input-norm"]
    torch.save(state, state_path)
    assert run_server(grid, fed(tmp_path, "resumed", num_server_rounds=5, strategy="fedadam",
                                resume=True)).rounds_completed == 5


@pytest.mark.parametrize("strategy", list_strategies())
def test_every_strategy_runs_a_round(cohort, tmp_path, strategy):
    run_server(grid_for(cohort), fed(tmp_path, num_server_rounds=2, strategy=strategy))
    rows = history(tmp_path / "run")
    assert all(r["aggregated"] == 3 for r in rows) and np.isfinite(rows[-1]["val-loss"])


def test_fedprox_sends_mu_and_float16_halves_the_upload(cohort, tmp_path):
    grid = grid_for(cohort)
    wide = {"hidden_dim": 256, "attn_dim": 128}  # big enough that .npy headers do not blur the ratio
    run_server(grid, fed(tmp_path, "prox", num_server_rounds=1, strategy="fedprox", proximal_mu=0.5, **wide))
    run_server(grid_for(cohort), fed(tmp_path, "half", num_server_rounds=1, transport="float16", **wide))
    full, half = history(tmp_path / "prox")[0], history(tmp_path / "half")[0]
    assert 0.45 < half["bytes-per-client"] / full["bytes-per-client"] < 0.55
    model, _ = load_checkpoint(tmp_path / "prox" / "last.pt")
    n_params = sum(p.numel() for p in model.parameters())
    assert full["bytes-per-client"] <= 1.05 * 4 * n_params


def test_sites_with_other_feature_spaces_are_refused(tmp_path):
    make_site(tmp_path / "mixed", "site_1", 8, 0)
    make_site(tmp_path / "mixed", "site_2", 8, 1, encoder="enc-b")
    grid = InlineGrid(make_client_app(tmp_path / "mixed"), [{"partition-id": i} for i in range(2)])
    with pytest.raises(Exception, match="encoder"):
        run_server(grid, fed(tmp_path, min_available_nodes=2))


def test_node_config_paths_select_the_site(cohort, tmp_path):
    site = cohort / "site_2"
    (tmp_path / "policy.toml").write_text("min-train-bags = 1\nallow-site-metrics = true\n")  # a 12-slide site
    node = {"data-path": str(site / "features"), "labels": str(site / "labels.csv"),
            "policy": str(tmp_path / "policy.toml"), "audit-log": str(tmp_path / "audit.jsonl")}
    grid = InlineGrid(make_client_app(), [node, node])
    run_server(grid, fed(tmp_path, num_server_rounds=1, min_available_nodes=2))
    assert history(tmp_path / "run")[0]["aggregated"] == 2
    bad = InlineGrid(make_client_app(), [{"data-path": str(tmp_path / "nowhere"), "labels": "x.csv"}] * 2)
    with pytest.raises(FederationError, match="only 0 of 2 sites"):
        run_server(bad, fed(tmp_path, "bad", num_server_rounds=1, min_available_nodes=2))


def test_client_config_carries_no_server_paths(tmp_path):
    record = client_config(fed(tmp_path), ["0", "1"])
    assert isinstance(record, ConfigRecord)
    assert "out-dir" not in record and "resume" not in record and record["classes"] == ["0", "1"]


@pytest.mark.slow
def test_simulation_engine_end_to_end(cohort, tmp_path, capsys):
    """`wsi-fl federate` on Flower's simulation engine (Ray): same numbers as the in-process grid."""
    out = tmp_path / "sim"
    args = ["federate", "--cohort", str(cohort), "--out", str(out), "--num-server-rounds", "2",
            "--hidden-dim", "32", "--attn-dim", "16", "--lr", "0.002", "--test-frac", "0.3", "--val-frac", "0.2",
            "--min-available-nodes", "3"]
    assert main(args) == 0
    assert "federated fedavg: 2 rounds" in capsys.readouterr().out
    run_server(grid_for(cohort), fed(tmp_path, "inline", num_server_rounds=2))
    sim, inline = history(out), history(tmp_path / "inline")
    for a, b in zip(sim, inline, strict=True):
        assert a["aggregated"] == 3
        assert a["val-loss"] == pytest.approx(b["val-loss"], abs=1e-5)


def test_comparison_scores_every_model_on_the_same_held_out_slides(cohort, tmp_path):
    from models import MILConfig
    from wsi_fl.evaluation.compare import format_table, held_out_records, plot_comparison, score_models
    from wsi_fl.evaluation.evaluate import EvalOptions
    from wsi_fl.mil.fit import fit
    from wsi_fl.mil.training import TrainConfig

    sites = discover_cohort(cohort)
    train = TrainConfig(epochs=4, lr=2e-3, early_stopping="none")
    model = MILConfig(hidden_dim=32, attn_dim=16)
    kw = {"model": model, "train": train, "val_frac": 0.2, "test_frac": 0.3, "eval_opts": EvalOptions(n_bootstrap=0),
          "progress": False}
    fit(sites, tmp_path / "pooled", **kw)
    fit(sites[:1], tmp_path / "local", **kw)
    run_server(grid_for(cohort), fed(tmp_path, "fed", num_server_rounds=4, auc_bins=20_000))
    scored = score_models({"federated": tmp_path / "fed" / "last.pt", "pooled": tmp_path / "pooled" / "model.pt",
                           "local site_1": tmp_path / "local" / "model.pt"}, sites, val_frac=0.2, test_frac=0.3)
    records, _ = held_out_records(sites, label_col="label", val_frac=0.2, test_frac=0.3, seed=0)
    assert {s.n for s in scored} == {len(records)} and {s for s, _ in records} == set(sites)
    for s in scored:  # the same slides in the same order for every model
        np.testing.assert_array_equal(s.targets, scored[0].targets)
    federated = next(s for s in scored if s.name == "federated")
    # The federation's AUC from histograms is scikit-learn's on the pooled scores (bins fine enough for no ties).
    assert federated.auc == pytest.approx(history(tmp_path / "fed")[-1]["test-auc"], abs=1e-9)
    splits = (tmp_path / "pooled" / "splits.csv").read_text().splitlines()
    assert sum(line.endswith(",test") for line in splits) == len(records)
    assert "pooled" in format_table(scored)
    assert plot_comparison(scored, tmp_path / "cmp.png").stat().st_size > 0


def test_federate_cli_usage_errors_are_one_line(tmp_path, capsys):
    assert main(["federate", "--cohort", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "cohort directory does not exist" in err
    (tmp_path / "empty").mkdir()
    assert main(["federate", "--cohort", str(tmp_path / "empty"), "--out", str(tmp_path / "o")]) == 2
    assert "no site directories" in capsys.readouterr().err
    assert main(["federate", "--cohort", str(tmp_path / "empty"), "--out", str(tmp_path / "o"),
                 "--val-frac", "0.6", "--test-frac", "0.5"]) == 2
    assert "val-frac + test-frac < 1" in capsys.readouterr().err
