"""Central differential privacy: calibration, accounting, clipping where the mode says, noise, budget, resume."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from bagsites import grid_for, history
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg

from models.checkpoint import load_checkpoint
from wsi_fl.engines.inline import InlineGrid
from wsi_fl.federation import arrays as fedarrays
from wsi_fl.federation.config import FedConfig
from wsi_fl.privacy.central import KEY_DP_WEIGHT, PrivacyPlan, calibrate_noise, epsilon_after, wrap_strategy
from wsi_fl.server.loop import FederationError, run_server
from wsi_fl.site.app import make_client_app

SMALL = {"hidden_dim": 32, "attn_dim": 16, "lr": 2e-3, "test_frac": 0.3, "val_frac": 0.2, "min_available_nodes": 3,
         "min_train_nodes": 2, "num_server_rounds": 3}



def fed(tmp_path: Path, name: str = "run", **kw) -> FedConfig:
    return FedConfig(**{**SMALL, "out_dir": str(tmp_path / name), **kw})



def update_norms(grid: InlineGrid, start: dict[int, ArrayRecord]) -> list[float]:
    """L2 norm of each training reply's update, against the global model its round started from."""
    norms = []
    for reply in grid.sent:
        if reply.metadata.message_type != MessageType.TRAIN or reply.has_error():
            continue
        got = fedarrays.to_numpy(reply.content["arrays"])
        ref = fedarrays.to_numpy(start[reply.metadata.reply_to_message_id])
        norms.append(float(np.sqrt(sum(((got[k].astype(np.float64) - ref[k]) ** 2).sum() for k in got))))
    return norms


# -- calibration and accounting ------------------------------------------------------------------------------------

@pytest.mark.parametrize("target", [1.0, 3.0, 8.0])
def test_calibrated_noise_is_the_smallest_that_meets_the_target(target):
    sigma = calibrate_noise(target, 1e-5, 30)
    assert epsilon_after(sigma, 30, 1e-5) <= target
    assert epsilon_after(sigma * 0.99, 30, 1e-5) > target  # not needlessly noisy
    assert epsilon_after(sigma, 60, 1e-5) > target  # twice the rounds spend more


@pytest.mark.parametrize("config, message", [
    ({"dp": "client-fixed"}, "needs dp-epsilon > 0 or dp-noise-multiplier > 0"),
    ({"dp": "server-fixed", "dp_epsilon": 8.0, "strategy": "fedmedian"}, "needs strategy fedavg or fedprox"),
    ({"dp": "server-fixed", "dp_epsilon": 8.0, "dp_delta": 1.0}, "dp-delta must be in (0, 1)"),
    ({"dp": "laplace"}, "dp must be one of"),
])
def test_bad_privacy_config_is_a_one_line_error(config, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        FedConfig(**config)


def test_noise_added_to_the_mean_has_the_calibrated_standard_deviation():
    """Flower's wrapper: equal-weight mean of the clipped updates plus N(0, (σ C / m)^2) per coordinate."""
    rng = np.random.default_rng(0)
    start = np.zeros(200_000, np.float32)
    sigma, norm, m = 2.0, 0.5, 4
    plan = PrivacyPlan("server-fixed", sigma, norm, 1e-5, m, None)
    strategy = wrap_strategy(FedAvg(weighted_by_key=KEY_DP_WEIGHT), plan, m)
    grid = InlineGrid(make_client_app(), [{}] * m)  # sets Flower's task identity; nothing is sent
    strategy.configure_train(1, ArrayRecord({"w": Array(start)}), ConfigRecord({}), grid)
    updates = [rng.standard_normal(start.shape).astype(np.float32) * s for s in (0.001, 0.01, 1.0, 10.0)]
    replies = []
    for i, upd in enumerate(updates):
        msg = Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=i + 1, message_type=MessageType.TRAIN)
        replies.append(Message(RecordDict({"arrays": ArrayRecord({"w": Array(start + upd)}),
                                           "metrics": MetricRecord({KEY_DP_WEIGHT: 1})}), reply_to=msg))
    new, _ = strategy.aggregate_train(1, replies)
    clipped = [u * min(1.0, norm / np.linalg.norm(u)) for u in updates]
    noise = new["w"].numpy() - np.mean(clipped, axis=0)
    assert abs(noise.std() / (sigma * norm / m) - 1) < 0.01
    assert abs(noise.mean()) < 0.01 * sigma * norm / m


# -- a federation under DP -----------------------------------------------------------------------------------------

def starts_of(grid: InlineGrid) -> dict[str, ArrayRecord]:
    """Record the global model each training instruction carried (by message id)."""
    starts: dict[str, ArrayRecord] = {}
    send = grid.send_and_receive

    def recording(messages, *, timeout=None):
        messages = list(messages)
        for msg in messages:
            if msg.metadata.message_type == MessageType.TRAIN:
                starts[msg.object_id] = msg.content["arrays"]
        return send(messages, timeout=timeout)

    grid.send_and_receive = recording
    return starts


def test_client_side_clipping_bounds_what_a_site_sends_and_epsilon_is_reported(cohort, tmp_path):
    grid = grid_for(cohort)
    starts = starts_of(grid)
    cfg = fed(tmp_path, dp="client-fixed", dp_noise_multiplier=1.5, dp_clipping_norm=0.05, seed=1)
    result = run_server(grid, cfg)
    norms = update_norms(grid, starts)
    assert len(norms) == 9 and max(norms) <= 0.05 * (1 + 1e-5)
    rows = history(result.out_dir)
    for r, row in enumerate(rows, start=1):
        assert row["aggregated"] == 3 and row["dp-releases"] == r
        assert row["dp-epsilon"] == pytest.approx(epsilon_after(1.5, r, 1e-5), rel=1e-9)
    _, ckpt = load_checkpoint(result.out_dir / "last.pt")
    assert ckpt.meta["metrics"]["dp-epsilon"] == rows[-1]["dp-epsilon"] > 0


def test_without_client_clipping_sites_send_unclipped_updates(cohort, tmp_path):
    """Server-side modes clip on the server: the sites' own replies are not clipped (the control for the test above)."""
    grid = grid_for(cohort)
    starts = starts_of(grid)
    run_server(grid, fed(tmp_path, dp="server-fixed", dp_noise_multiplier=1.5, dp_clipping_norm=0.05, seed=1))
    assert min(update_norms(grid, starts)) > 0.05


def test_adaptive_clipping_moves_the_norm_and_accepts_the_sites_clip_bits(cohort, tmp_path):
    result = run_server(grid_for(cohort), fed(tmp_path, dp="client-adaptive", dp_noise_multiplier=1.0,
                                              dp_clipping_norm=0.01))
    rows = history(result.out_dir)
    assert [r["aggregated"] for r in rows] == [3, 3, 3] and [r["rejected"] for r in rows] == [0, 0, 0]
    assert rows[-1]["dp-clipping-norm"] != pytest.approx(0.01)  # every site clipped: the norm grows


def test_target_epsilon_is_met_and_a_longer_resume_is_refused(cohort, tmp_path):
    cfg = fed(tmp_path, dp="server-fixed", dp_epsilon=3.0, dp_clipping_norm=0.1)
    rows = history(run_server(grid_for(cohort), cfg).out_dir)
    assert rows[-1]["dp-epsilon"] <= 3.0 and rows[-1]["dp-epsilon"] > 0.99 * 3.0
    assert rows[-1]["dp-noise-multiplier"] == pytest.approx(calibrate_noise(3.0, 1e-5, 3))
    longer = FedConfig(**{**cfg.__dict__, "num_server_rounds": 5, "resume": True})
    with pytest.raises(FederationError, match="round 4 would spend more than the privacy budget"):
        run_server(grid_for(cohort), longer)


def test_resume_continues_the_same_ledger(cohort, tmp_path):
    cfg = fed(tmp_path, dp="server-fixed", dp_noise_multiplier=2.0, num_server_rounds=2)
    run_server(grid_for(cohort), cfg)
    result = run_server(grid_for(cohort), FedConfig(**{**cfg.__dict__, "num_server_rounds": 4, "resume": True}))
    rows = history(result.out_dir)
    assert [r["dp-releases"] for r in rows] == [1, 2, 3, 4]
    assert rows[-1]["dp-epsilon"] == pytest.approx(epsilon_after(2.0, 4, 1e-5), rel=1e-9)


def test_a_round_missing_a_site_publishes_nothing_under_dp(cohort, tmp_path):
    """The noise is calibrated to the mean of all sampled sites; a mean over fewer would be under-noised."""
    grid = grid_for(cohort, faults={2: lambda reply, rnd: None if rnd == 2 else reply})
    rows = history(run_server(grid, fed(tmp_path, dp="server-fixed", dp_noise_multiplier=2.0,
                                        round_timeout=5)).out_dir)
    assert [r["aggregated"] for r in rows] == [3, 0, 3]
    assert [r["dp-releases"] for r in rows] == [1, 1, 2]


def test_dp_noise_changes_the_model_and_more_noise_hurts_more(cohort, tmp_path):
    plain = history(run_server(grid_for(cohort), fed(tmp_path, "plain", num_server_rounds=6)).out_dir)[-1]
    noisy = history(run_server(grid_for(cohort), fed(tmp_path, "noisy", num_server_rounds=6, dp="server-fixed",
                                                     dp_noise_multiplier=50.0, dp_clipping_norm=1.0)).out_dir)[-1]
    assert plain["test-loss"] < noisy["test-loss"]


@pytest.mark.parametrize("min_noise, aggregated", [(0.5, [3, 3]), (100.0, None)])
def test_a_site_requiring_dp_checks_the_noise_in_force(cohort, tmp_path, min_noise, aggregated):
    """Calibrated to a target epsilon, every instruction (query, train, evaluate) declares the noise multiplier."""
    policy = tmp_path / "policy.toml"
    policy.write_text(f"min-train-bags = 1\nallow-site-metrics = true\nrequire-dp = true\n"
                      f"min-noise-multiplier = {min_noise}\n")
    grid = InlineGrid(make_client_app(cohort), [{"partition-id": i, "policy": str(policy)} for i in range(3)])
    cfg = fed(tmp_path, dp="client-fixed", dp_epsilon=8.0, num_server_rounds=2)  # noise multiplier 0.90
    if aggregated is None:
        with pytest.raises(FederationError, match="described their data"):
            run_server(grid, cfg)
        return
    rows = history(run_server(grid, cfg).out_dir)
    assert [r["aggregated"] for r in rows] == aggregated and all(r["eval-replies"] == 3 for r in rows)
