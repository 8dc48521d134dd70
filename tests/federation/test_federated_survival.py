"""Federated survival: three real HDF5 bag sites, the real ClientApp and ServerApp loop (in-process grid).

The server's pooled C-index comes from the sites' summed time x risk count grids only; it must equal
scikit-survival's C-index of the same final model's scores on all sites' test slides, pooled, within 0.01. A site
whose policy does not allow survival histograms refuses to evaluate (and says so in its audit log); Cox under
slide-level DP-SGD is refused in one line before anything runs.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from bagsites import DIM, _attrs
from flwr.app import Message, MessageType, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from sksurv.metrics import concordance_index_censored

from models.checkpoint import load_checkpoint
from preprocessing.h5format import FeatureWriter
from wsi_fl.engines.inline import InlineGrid
from wsi_fl.errors import ConfigError
from wsi_fl.federation.config import FedConfig
from wsi_fl.federation.survival_histograms import agreed_edges, survival_histograms
from wsi_fl.mil.training import predict_risk
from wsi_fl.server.loop import run_server
from wsi_fl.server.replies import aggregate_survival_evaluation
from wsi_fl.site.app import make_client_app
from wsi_fl.site.data import discover_cohort, load_site
from wsi_fl.site.policy import PolicyViolation, SiteFacts, SitePolicy, check_instruction, suppress_small_splits

T_MAX = 10.0


def make_survival_site(root: Path, name: str, n: int, seed: int) -> None:
    """Bags of 8-16 instances; a latent risk z shifts 4 features of half the instances; time ~ Exp(rate e^z)."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        slide_id, z = f"{name}_s{i:02d}", float(rng.normal())
        k = int(rng.integers(8, 16))
        x = rng.standard_normal((k, DIM)).astype(np.float32)
        x[: k // 2, :4] += z
        with FeatureWriter(root / name / "features" / f"{slide_id}.h5", DIM, _attrs(slide_id)) as w:
            w.append(np.stack([np.arange(k) * 448, np.zeros(k)], axis=1), x)
            w.commit()
        t_event, t_censor = rng.exponential(3.0 / np.exp(z)), rng.uniform(1.0, 9.0)
        rows.append((slide_id, f"{min(t_event, t_censor):.4f}", int(t_event <= t_censor)))
    with (root / name / "labels.csv").open("w", newline="") as f:
        csv.writer(f).writerows([("slide_id", "time", "event"), *rows])


@pytest.fixture(scope="module")
def survival_cohort(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("survival-cohort")
    for k, n in enumerate((30, 34, 38)):
        make_survival_site(root, f"site_{k + 1}", n, seed=7 + 31 * k)
    return root


def survival_cfg(out: Path, **kw) -> FedConfig:
    return FedConfig(**{"task": "survival", "model": "attention", "hidden_dim": 16, "attn_dim": 8, "dropout": 0.0,
                        "lr": 1e-2, "val_frac": 0.2, "test_frac": 0.35, "num_server_rounds": 3, "batch_size": 16,
                        "min_available_nodes": 3, "min_train_nodes": 3, "min_evaluate_nodes": 3,
                        "hist_time_max": T_MAX, "hist_time_bins": 128, "hist_risk_min": -3.0, "hist_risk_max": 3.0,
                        "hist_risk_bins": 256, "out_dir": str(out), **kw})


def grid(cohort: Path, tmp_path: Path, extra: dict[int, dict] | None = None) -> InlineGrid:
    configs = [{"partition-id": i, "audit-log": str(tmp_path / f"audit-{i}.jsonl"), **(extra or {}).get(i, {})}
               for i in range(3)]
    return InlineGrid(make_client_app(cohort), configs)


def audit_lines(tmp_path: Path, i: int) -> list[dict]:
    return [json.loads(line) for line in (tmp_path / f"audit-{i}.jsonl").read_text().splitlines()]


def test_federated_c_index_from_histograms_equals_pooled_c_index(survival_cohort, tmp_path):
    cfg = survival_cfg(tmp_path / "run")
    g = grid(survival_cohort, tmp_path)
    result = run_server(g, cfg)
    last = result.history[-1]
    for split in ("train", "val", "test"):
        assert {f"{split}-c-index", f"{split}-td-auc", f"{split}-loss", f"{split}-events"} <= set(last)
    assert (tmp_path / "run" / "best.pt").is_file()
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert logged[-1]["test-c-index"] == last["test-c-index"]

    # The same final model (last.pt is the global model the last evaluation scored) on every site's test slides.
    model, _ = load_checkpoint(tmp_path / "run" / "last.pt")
    times, events, risks = [], [], []
    for site in discover_cohort(survival_cohort):
        data = load_site(site, classes=tuple(cfg.outputs(())), label_col=cfg.label_col, val_frac=cfg.val_frac,
                         test_frac=cfg.test_frac, seed=cfg.seed, max_instances=None, survival=("time", "event"))
        preds = predict_risk(model, data.test, "cox")
        times.append(preds.time), events.append(preds.event), risks.append(preds.risk)
    t, e, r = np.concatenate(times), np.concatenate(events), np.concatenate(risks)
    pooled = concordance_index_censored(e, t, r)[0]
    assert last["test-n"] == len(t) and last["test-events"] == int(e.sum())
    assert abs(last["test-c-index"] - pooled) <= 0.01, (last["test-c-index"], pooled)
    assert pooled > 0.6  # it learnt the latent risk, so the comparison is not between two coin flips

    # What left each site: counts only (no time, score or slide id), and the audit log says how many.
    evaluations = [m for m in g.sent if not m.has_error() and "metrics" in m.content.metric_records
                   and "test-surv-hist" in m.content["metrics"]]
    assert len(evaluations) == 9
    for m in evaluations:
        keys = set(m.content["metrics"].keys())
        assert keys == {f"{s}-{k}" for s in ("train", "val", "test") for k in ("n", "events", "loss-sum", "surv-hist")
                        } | {"num-examples"}
        assert all(isinstance(v, int) for v in m.content["metrics"]["test-surv-hist"])
    sent = [line for line in audit_lines(tmp_path, 0) if line["event"] == "sent" and "survival-histograms" in line]
    assert len(sent) == 3
    assert sent[-1]["survival-histograms"]["test"]["grid"] == [2, 128, 256]
    site0 = load_site(discover_cohort(survival_cohort)[0], classes=tuple(cfg.outputs(())), label_col="label",
                      val_frac=cfg.val_frac, test_frac=cfg.test_frac, seed=0, max_instances=None,
                      survival=("time", "event"))
    assert sent[-1]["survival-histograms"]["test"]["patients"] == len(site0.test)


def test_discrete_time_federation_runs(survival_cohort, tmp_path):
    cfg = survival_cfg(tmp_path / "run", survival_loss="discrete", time_bins=4, num_server_rounds=1,
                       hist_risk_min=0.0, hist_risk_max=0.0)
    assert cfg.risk_range() == (-4.0, 0.0)
    row = run_server(grid(survival_cohort, tmp_path), cfg).history[-1]
    model, ckpt = load_checkpoint(tmp_path / "run" / "last.pt")
    assert model.config.n_classes == 4 and ckpt.classes == ["hazard-0", "hazard-1", "hazard-2", "hazard-3"]
    assert 0.0 <= row["test-c-index"] <= 1.0 and row["eval-replies"] == 3


def test_discrete_time_trains_under_slide_dpsgd(survival_cohort, tmp_path):
    """The discrete-time loss is a sum of per-slide terms, so each site trains it with DP-SGD and reports its ε."""
    cfg = survival_cfg(tmp_path / "run", survival_loss="discrete", time_bins=4, num_server_rounds=2,
                       hist_risk_min=0.0, hist_risk_max=0.0, dp="slide-dpsgd", dp_epsilon=8.0, dp_batch_size=4)
    g = grid(survival_cohort, tmp_path)
    history = run_server(g, cfg).history
    assert [row["aggregated"] for row in history] == [3, 3] and 0.0 <= history[-1]["test-c-index"] <= 1.0
    trained = [m.content["metrics"] for m in g.sent if not m.has_error() and "arrays" in m.content.array_records]
    assert len(trained) == 6
    spent = [float(m["dp-epsilon"]) for m in trained]
    assert all(0 < e <= 8.0 * (1 + 1e-6) for e in spent)  # within each site's plan, which the whole run spends
    assert all("train-loss" not in m for m in trained)  # the loss is not private, so it is not sent


def test_site_policy_refuses_survival_histograms(survival_cohort, tmp_path):
    policy = tmp_path / "policy.toml"
    policy.write_text("allow-site-metrics = true\nallow-survival-histograms = false\nmin-train-bags = 1\n"
                      "min-eval-slides = 1\n")
    cfg = survival_cfg(tmp_path / "run", num_server_rounds=1, min_evaluate_nodes=2)
    row = run_server(grid(survival_cohort, tmp_path, {0: {"policy": str(policy)}}), cfg).history[-1]
    assert row["eval-replies"] == 2 and row["aggregated"] == 3  # it trains, but reports no histogram
    refused = [line for line in audit_lines(tmp_path, 0) if line["event"] == "refused"]
    assert len(refused) == 1 and refused[0]["message-type"] == MessageType.EVALUATE
    assert "allow-survival-histograms is false" in refused[0]["reason"]
    # The rule itself: explicit in both directions, and only for survival runs.
    allowed = SitePolicy(allow_site_metrics=True, allow_survival_histograms=True)
    denied = SitePolicy(allow_site_metrics=True)
    check_instruction(allowed, MessageType.EVALUATE, {"task": "survival"}, SiteFacts())
    check_instruction(denied, MessageType.EVALUATE, {"task": "classification"}, SiteFacts())
    with pytest.raises(PolicyViolation, match="allow-survival-histograms"):
        check_instruction(denied, MessageType.EVALUATE, {"task": "survival"}, SiteFacts())


def test_cox_under_slide_dpsgd_is_refused_in_one_line():
    with pytest.raises(ConfigError, match="Cox loss cannot be trained under slide-level DP-SGD") as err:
        FedConfig(task="survival", hist_time_max=T_MAX, dp="slide-dpsgd", dp_noise_multiplier=1.0)
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="hist-time-max"):
        FedConfig.from_run_config({"task": "survival"})  # the grid must be agreed before any data is seen
    FedConfig(task="survival", hist_time_max=T_MAX, dp="client-fixed", dp_noise_multiplier=1.0)  # the site is the unit


def _reply(metrics: dict) -> Message:
    # A message built outside a run needs Flower's task identity, which the in-process grid sets when it runs:
    # without this, these tests passed only after a federation test of this module had run first.
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), dst_node_id=0, message_type=MessageType.EVALUATE)


def test_server_sums_site_grids_and_rejects_inconsistent_counts():
    cfg = FedConfig(task="survival", hist_time_max=T_MAX, hist_time_bins=32, hist_risk_bins=32)
    edges = agreed_edges(cfg)
    rng = np.random.default_rng(0)
    sites = [(rng.uniform(0, T_MAX, n), rng.random(n) < 0.5, rng.normal(size=n)) for n in (15, 20, 25)]
    replies = []
    for t, e, r in sites:
        h = survival_histograms(t, e, r, *edges)
        m = {}
        for split in ("train", "val", "test"):
            m.update({f"{split}-n": len(t), f"{split}-events": int(e.sum()), f"{split}-loss-sum": 1.0,
                      f"{split}-surv-hist": h.ravel().tolist()})
        replies.append(_reply(m))
    out = aggregate_survival_evaluation(replies, cfg)
    pooled = survival_histograms(*(np.concatenate(a) for a in zip(*sites, strict=True)), *edges)
    from wsi_fl.federation.survival_histograms import histogram_c_index

    assert out["eval-replies"] == 3 and out["test-n"] == 60
    assert out["test-c-index"] == pytest.approx(histogram_c_index(pooled))
    assert out["test-td-auc-time"] in edges[0][1:-1]
    bad = dict(replies[0].content["metrics"])
    bad["test-n"] = 14  # counts that do not add up: the reply is dropped, not summed
    assert aggregate_survival_evaluation([_reply(bad), *replies[1:]], cfg)["test-n"] == 45
    small, suppressed = suppress_small_splits(bad, 15)
    assert suppressed == ["test"] and small["test-surv-hist"] == [0] * len(bad["test-surv-hist"])
    assert small["test-events"] == 0 and small["train-n"] == 15


def test_server_warns_when_risks_fall_off_the_agreed_axis(caplog):
    """Risks beyond the agreed axis tie in its end bins: the C-index reads 0.5, and the server says why."""
    cfg = FedConfig(task="survival", hist_time_max=T_MAX, hist_time_bins=16, hist_risk_bins=32)  # risk axis -5..5
    rng = np.random.default_rng(1)
    t, e = rng.uniform(0.5, T_MAX, 40), rng.random(40) < 0.6
    good = -t + rng.normal(0, 0.3, 40)  # earlier events, higher risk: well ordered, inside -10..0 is not
    edges = agreed_edges(cfg)

    def reply(risk):
        h = survival_histograms(t, e, risk, *edges).ravel().tolist()
        return _reply({f"{s}-{k}": v for s in ("train", "val", "test") for k, v in
                       (("n", 40), ("events", int(e.sum())), ("loss-sum", 1.0), ("surv-hist", h))})

    with caplog.at_level("WARNING", logger="wsi_fl.server"):
        inside = aggregate_survival_evaluation([reply(good / 2 + 2.5)], cfg)  # within -5..5
    assert inside["test-c-index"] > 0.8 and inside["test-risk-at-ends"] < 0.2 and not caplog.records
    with caplog.at_level("WARNING", logger="wsi_fl.server"):
        drifted = aggregate_survival_evaluation([reply(good - 12.0)], cfg)  # the same ranking, 12 lower
    assert drifted["test-risk-at-ends"] == 1.0 and drifted["test-c-index"] == pytest.approx(0.5)
    assert "widen hist-risk-min/hist-risk-max" in caplog.text and "test 100%" in caplog.text
