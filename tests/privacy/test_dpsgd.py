"""Slide-level DP-SGD at each site: accounting, per-bag clipping, noise, secret randomness, budget, federation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from bagsites import grid_for, history
from flwr.app import Context, Message, MessageType, RecordDict

from models import MILConfig, create_model
from models.checkpoint import load_checkpoint
from wsi_fl.engines.inline import InlineGrid
from wsi_fl.federation import arrays as fedarrays
from wsi_fl.federation.config import FedConfig
from wsi_fl.mil.data import Bag
from wsi_fl.mil.training import BagCrossEntropy, SurvivalLoss
from wsi_fl.privacy import central as privacy
from wsi_fl.privacy import dpsgd
from wsi_fl.server.loop import FederationError, client_config, run_server
from wsi_fl.site.app import make_client_app

SMALL = {"hidden_dim": 32, "attn_dim": 16, "lr": 2e-3, "test_frac": 0.3, "val_frac": 0.2, "min_available_nodes": 3,
         "min_train_nodes": 2, "num_server_rounds": 3, "dp": "slide-dpsgd", "dp_batch_size": 2}


def fed(tmp_path: Path, name: str = "run", **kw) -> FedConfig:
    return FedConfig(**{**SMALL, "out_dir": str(tmp_path / name), **kw})


def bag(n: int, dim: int, target: int, scale: float = 1.0, seed: int = 0) -> Bag:
    g = torch.Generator().manual_seed(seed)
    return Bag(features=torch.randn(n, dim, generator=g) * scale, target=target, slide_id=f"s{seed}")


def plan(**kw) -> dpsgd.DpSgdPlan:
    base = {"noise_multiplier": 0.0, "clipping_norm": 1.0, "sample_rate": 1.0, "steps_per_epoch": 1,
            "local_epochs": 1, "rounds": 1, "delta": 1e-5}
    return dpsgd.DpSgdPlan(**{**base, **kw})


# -- accounting ----------------------------------------------------------------------------------------------------

def test_without_sampling_the_accountant_agrees_with_flowers():
    """q = 1 is the plain Gaussian mechanism, which Flower's own accountant (central DP) also computes.

    Integer Rényi orders only (see RDP_ORDERS) make ours a little looser: never below Flower's, within 5 %.
    """
    for sigma, steps in ((1.0, 1), (2.0, 40), (0.8, 7), (4.0, 40)):
        ours, flowers = dpsgd.epsilon_after(sigma, 1.0, steps, 1e-5), privacy.epsilon_after(sigma, steps, 1e-5)
        assert flowers <= ours <= 1.05 * flowers


@pytest.mark.parametrize("target", [1.0, 3.0, 8.0])
def test_each_site_calibrates_to_the_target_for_its_own_size(target):
    plans = [dpsgd.make_plan(n, batch_size=8, local_epochs=1, rounds=40, clipping_norm=1.0, delta=1e-5,
                             target_epsilon=target) for n in (20, 60, 200)]
    for p in plans:
        assert p.epsilon(p.total_steps) <= target
        assert dpsgd.epsilon_after(p.noise_multiplier * 0.99, p.sample_rate, p.total_steps, 1e-5) > target
        assert p.epsilon(p.total_steps + p.steps_per_round) > target  # one round more would exceed it
    assert [p.steps_per_epoch for p in plans] == [2, 8, 25]  # an epoch in expectation: N / batch steps
    sigmas = [p.noise_multiplier for p in plans]
    assert sigmas[0] > sigmas[1] > sigmas[2]  # more slides, more amplification by sampling, less noise


# -- one step ------------------------------------------------------------------------------------------------------

def small_model(dim: int = 16, hidden: int = 32):
    torch.manual_seed(0)
    return create_model(MILConfig(in_dim=dim, n_classes=2, hidden_dim=hidden, attn_dim=16, dropout=0.0))


def grad_vector(model) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])


def test_each_bags_gradient_is_clipped_to_the_norm():
    """Without noise, one bag's contribution is its gradient scaled to norm C (C below its norm) or left as is."""
    model = small_model()
    big = bag(30, 16, 1, scale=50.0)
    dpsgd.private_step(model, [big], BagCrossEntropy(), plan(clipping_norm=1e6), 1.0, dpsgd.secret_generator(),
                       torch.device("cpu"))
    raw = grad_vector(model).clone()
    assert raw.norm() > 0.1
    dpsgd.private_step(model, [big], BagCrossEntropy(), plan(clipping_norm=0.01), 1.0, dpsgd.secret_generator(),
                       torch.device("cpu"))
    clipped = grad_vector(model)
    assert clipped.norm().item() == pytest.approx(0.01, rel=1e-4)
    assert torch.allclose(clipped / clipped.norm(), raw / raw.norm(), atol=1e-5)  # same direction
    # Two bags: the sum of two clipped gradients, divided by the expected batch size.
    dpsgd.private_step(model, [big, bag(30, 16, 0, scale=50.0, seed=1)], BagCrossEntropy(),
                       plan(clipping_norm=0.01), 4.0, dpsgd.secret_generator(), torch.device("cpu"))
    assert grad_vector(model).norm().item() <= 2 * 0.01 / 4.0 * (1 + 1e-4)


def test_discrete_time_survival_gradients_are_clipped_per_slide_and_cox_is_refused():
    """Survival under DP-SGD: each slide's discrete-time term is its own gradient, clipped like a class bag's."""
    edges = np.array([0.0, 2.0, 4.0, 6.0, 8.0])
    model = create_model(MILConfig(in_dim=16, n_classes=4, hidden_dim=32, attn_dim=16, dropout=0.0))
    slides = [Bag(features=bag(20, 16, 0, scale=20.0, seed=k).features, target=0, slide_id=f"s{k}", time=t, event=e)
              for k, (t, e) in enumerate([(1.5, True), (7.0, False)])]
    loss = SurvivalLoss("discrete", edges)
    dpsgd.private_step(model, slides[:1], loss, plan(clipping_norm=1e6), 1.0, dpsgd.secret_generator(),
                       torch.device("cpu"))
    raw = grad_vector(model).clone()
    assert raw.norm() > 1e-3
    dpsgd.private_step(model, slides[:1], loss, plan(clipping_norm=1e-4), 1.0, dpsgd.secret_generator(),
                       torch.device("cpu"))
    assert grad_vector(model).norm().item() == pytest.approx(1e-4, rel=1e-4)
    # Unclipped, two slides' step is the sum of their own steps: the loss is separable.
    dpsgd.private_step(model, slides[1:], loss, plan(clipping_norm=1e6), 1.0, dpsgd.secret_generator(),
                       torch.device("cpu"))
    other = grad_vector(model).clone()
    dpsgd.private_step(model, slides, loss, plan(clipping_norm=1e6), 1.0, dpsgd.secret_generator(),
                       torch.device("cpu"))
    assert torch.allclose(grad_vector(model), raw + other, atol=1e-6)
    with pytest.raises(ValueError, match="per-slide terms"):
        dpsgd.private_step(model, slides, SurvivalLoss("cox"), plan(), 1.0, dpsgd.secret_generator(),
                           torch.device("cpu"))


def test_the_noise_has_the_planned_standard_deviation():
    model = small_model(dim=256, hidden=512)
    dpsgd.private_step(model, [], BagCrossEntropy(), plan(noise_multiplier=1.3, clipping_norm=0.5), 4.0,
                       dpsgd.secret_generator(), torch.device("cpu"))
    g = grad_vector(model)
    assert g.numel() > 100_000
    assert g.std().item() == pytest.approx(1.3 * 0.5 / 4.0, rel=0.01)
    assert abs(g.mean().item()) < 0.01 * 1.3 * 0.5 / 4.0 * 10


def test_noise_and_sampling_do_not_follow_the_runs_seed():
    """The server knows the seed; if the noise followed it, the server could subtract it."""
    ds = [bag(20, 16, k % 2, seed=k) for k in range(6)]
    p = plan(noise_multiplier=1.0, sample_rate=0.5, steps_per_epoch=2)
    weights = []
    for _ in range(2):
        model = small_model()
        torch.manual_seed(123)
        dpsgd.train_round(model, ds, torch.optim.SGD(model.parameters(), lr=0.1), BagCrossEntropy(), p,
                          torch.device("cpu"))
        weights.append(torch.cat([q.detach().flatten() for q in model.parameters()]))
    assert not torch.allclose(weights[0], weights[1])


def test_a_model_with_buffers_is_refused():
    model = small_model()
    model.register_buffer("running_mean", torch.zeros(3))
    with pytest.raises(ValueError, match="buffers"):
        dpsgd.train_round(model, [bag(5, 16, 0)], torch.optim.SGD(model.parameters(), lr=0.1), BagCrossEntropy(),
                          plan(), torch.device("cpu"))


def test_the_budget_counts_steps_and_ignores_a_replayed_round_number():
    p = plan(steps_per_epoch=4, rounds=3)
    assert dpsgd.steps_done(1, 0, p) == 0 and dpsgd.steps_done(3, 0, p) == 8
    assert dpsgd.steps_done(1, 8, p) == 8  # round 1 again after two rounds: the site's own count holds
    dpsgd.check_budget(8, p)
    with pytest.raises(dpsgd.PrivacyBudgetError, match="past its privacy plan"):
        dpsgd.check_budget(9, p)


# -- in a federation -----------------------------------------------------------------------------------------------

def test_a_federation_under_slide_dpsgd_reports_each_sites_epsilon_and_sends_no_loss(cohort, tmp_path):
    grid = grid_for(cohort)
    cfg = fed(tmp_path, dp_epsilon=8.0)
    result = run_server(grid, cfg)
    rows = history(result.out_dir)
    assert [r["aggregated"] for r in rows] == [3, 3, 3]
    # The sites' plans, recomputed from their training bags: the row holds the most any site has spent.
    train_sizes = sorted({int(m.content["metrics"]["num-examples"]) for m in grid.sent
                          if m.metadata.message_type == MessageType.TRAIN})
    plans = [dpsgd.plan_for(n, cfg) for n in train_sizes]
    for r, row in enumerate(rows, start=1):
        assert row["dp-epsilon"] == pytest.approx(max(p.epsilon(r * p.steps_per_round) for p in plans), rel=1e-9)
        assert "train-loss" not in row
    assert 0.9 * 8.0 < rows[-1]["dp-epsilon"] <= 8.0
    for reply in grid.sent:
        if reply.metadata.message_type == MessageType.TRAIN:
            assert set(reply.content["metrics"].keys()) == {"num-examples", "dp-epsilon"}
    # The noise each site used is its own (none is sent by the server under slide-dpsgd).
    assert client_config(cfg, ["0", "1"])["dp-noise-multiplier"] == 0.0


def test_the_small_model_setting_runs_under_slide_dpsgd_and_its_checkpoint_keeps_the_input_norm(cohort, tmp_path):
    """The setting the threat model's synthetic figure uses: a small model on per-slide standardised features."""
    cfg = fed(tmp_path, dp_epsilon=8.0, num_server_rounds=2, hidden_dim=16, attn_dim=8, input_norm="slide")
    result = run_server(grid_for(cohort), cfg)
    assert [r["aggregated"] for r in history(result.out_dir)] == [3, 3]
    model, ckpt = load_checkpoint(Path(result.out_dir) / "last.pt")
    assert ckpt.config.input_norm == model.config.input_norm == "slide"


def test_any_strategy_keeps_the_guarantee_and_a_longer_resume_is_refused(cohort, tmp_path):
    """Aggregation is post-processing of private updates, so FedAdam is allowed; the plan is for the whole run."""
    cfg = fed(tmp_path, strategy="fedadam", dp_noise_multiplier=1.0, num_server_rounds=2)
    rows = history(run_server(grid_for(cohort), cfg).out_dir)
    assert [r["aggregated"] for r in rows] == [3, 3]
    with pytest.raises(FederationError, match="num-server-rounds: 2 -> 3"):
        run_server(grid_for(cohort), FedConfig(**{**cfg.__dict__, "num_server_rounds": 3, "resume": True}))


def test_a_site_refuses_a_round_beyond_its_plan(cohort, tmp_path, caplog):
    """A server that sends the same round number again cannot make the site spend more than it planned."""
    app = make_client_app(cohort)
    cfg = fed(tmp_path, dp_noise_multiplier=1.0, num_server_rounds=1)
    model = create_model(cfg.mil_config(16, 2))
    context = Context(run_id=1, node_id=1, node_config={"partition-id": 0}, state=RecordDict(), run_config={})

    def train(server_round: int) -> Message:
        config = client_config(cfg, None)
        config["server-round"] = server_round
        msg = Message(RecordDict({"arrays": fedarrays.to_record(model.state_dict()), "config": config}),
                      dst_node_id=1, message_type=MessageType.TRAIN)
        return app(msg, context)

    assert set(train(1).content["metrics"].keys()) == {"num-examples", "dp-epsilon"}
    refused = train(1)  # answered with an error reply; the server learns the type only
    assert refused.has_error() and refused.error.reason.startswith("PrivacyBudgetError at the site")
    assert "would take the site past its privacy plan" in caplog.text  # the site's own log has why


@pytest.mark.parametrize("min_noise, ok", [(0.5, True), (50.0, False)])
def test_a_site_requiring_dp_checks_the_noise_its_own_dpsgd_would_use(cohort, tmp_path, min_noise, ok):
    policy = tmp_path / "policy.toml"
    policy.write_text(f"min-train-bags = 1\nallow-site-metrics = true\nrequire-dp = true\n"
                      f"min-noise-multiplier = {min_noise}\n")
    grid = InlineGrid(make_client_app(cohort), [{"partition-id": i, "policy": str(policy)} for i in range(3)])
    rows = history(run_server(grid, fed(tmp_path, dp_epsilon=8.0, num_server_rounds=2, round_timeout=5)).out_dir)
    assert [r["aggregated"] for r in rows] == ([3, 3] if ok else [0, 0])
    refusals = [m.error.reason for m in grid.sent if m.metadata.message_type == MessageType.TRAIN and m.has_error()]
    assert ok == (not refusals)
    assert all("below min-noise-multiplier" in reason for reason in refusals) or ok


def test_slide_dpsgd_settings_are_checked():
    with pytest.raises(ValueError, match="dp-batch-size must be >= 1"):
        FedConfig(dp="slide-dpsgd", dp_noise_multiplier=1.0, dp_batch_size=0)
    with pytest.raises(ValueError, match="needs dp-epsilon > 0 or dp-noise-multiplier > 0"):
        FedConfig(dp="slide-dpsgd")
    assert np.isfinite(dpsgd.plan_for(10, FedConfig(dp="slide-dpsgd", dp_epsilon=3.0)).noise_multiplier)
