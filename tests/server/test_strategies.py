"""The strategy registry's FedAvg/FedProx server step: plain FedAvg at 1, a scaled move to the weighted mean else."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg

from wsi_fl.engines.inline import InlineGrid
from wsi_fl.federation.config import FedConfig
from wsi_fl.server.strategies import create_strategy, effective_sites
from wsi_fl.site.app import make_client_app

WEIGHTS = (10, 20, 40)


def one_round(strategy, start: np.ndarray, ends: list[np.ndarray], weights=WEIGHTS) -> np.ndarray:
    """The array a strategy makes of one round whose sites started from ``start`` and ended at ``ends``."""
    grid = InlineGrid(make_client_app(), [{}] * len(ends))  # gives Flower's task identity; nothing is sent
    list(strategy.configure_train(1, ArrayRecord({"w": Array(start)}), ConfigRecord({}), grid))
    replies = []
    for i, (end, w) in enumerate(zip(ends, weights, strict=True)):
        msg = Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=i + 1, message_type=MessageType.TRAIN)
        replies.append(Message(RecordDict({"arrays": ArrayRecord({"w": Array(end)}),
                                           "metrics": MetricRecord({"num-examples": w})}), reply_to=msg))
    new, _ = strategy.aggregate_train(1, replies)
    return new["w"].numpy()


@pytest.fixture
def round_arrays() -> tuple[np.ndarray, list[np.ndarray], np.ndarray]:
    rng = np.random.default_rng(0)
    start = rng.standard_normal(50).astype(np.float32)
    ends = [start + rng.standard_normal(50).astype(np.float32) for _ in WEIGHTS]
    mean = sum(w * e.astype(np.float64) for w, e in zip(WEIGHTS, ends, strict=True)) / sum(WEIGHTS)
    return start, ends, mean


def test_effective_sites() -> None:
    assert effective_sites([5, 5, 5]) == pytest.approx(3.0)
    assert effective_sites([7, 0, 0]) == pytest.approx(1.0)
    assert effective_sites([15, 30, 55]) == pytest.approx(1 / (0.15**2 + 0.3**2 + 0.55**2))


@pytest.mark.parametrize("strategy", ["fedavg", "fedprox"])
def test_server_step_one_is_flowers_fedavg(strategy: str, round_arrays) -> None:
    start, ends, _ = round_arrays
    ours = one_round(create_strategy(FedConfig(strategy=strategy)), start, ends)
    theirs = one_round(FedAvg(), start, ends)
    np.testing.assert_array_equal(ours, theirs)


@pytest.mark.parametrize("strategy", ["fedavg", "fedprox"])
@pytest.mark.parametrize("step", [2.5, 0.0])
def test_server_step_scales_the_move_to_the_weighted_mean(strategy: str, step: float, round_arrays) -> None:
    start, ends, mean = round_arrays
    new = one_round(create_strategy(FedConfig(strategy=strategy, server_step=step)), start, ends)
    expected_step = step or sum(WEIGHTS) ** 2 / sum(w * w for w in WEIGHTS)  # auto: 1/sum(w^2), here 49/21
    assert new.dtype == np.float32
    np.testing.assert_allclose(new, start + expected_step * (mean - start), rtol=1e-5, atol=1e-5)


def test_server_step_follows_the_global_model_of_each_round(round_arrays) -> None:
    """No stale state: the step is taken from the model the round was sent, as after a resume or a failed round."""
    start, ends, mean = round_arrays
    strategy = create_strategy(FedConfig(server_step=2.0))
    one_round(strategy, start + 100, [e + 100 for e in ends])
    np.testing.assert_allclose(one_round(strategy, start, ends), start + 2 * (mean - start), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("config", "message"), [
    ({"server_step": -1.0}, "server-step must be >= 0"),
    ({"server_step": 2.0, "strategy": "fedadam"}, "server-step applies to fedavg and fedprox only"),
    ({"server_step": 2.0, "dp": "client-fixed", "dp_epsilon": 8.0}, "server-step must be 1 with dp"),
    ({"server_step": 0.0, "secagg": True}, "as one update"),
])
def test_server_step_refusals(config: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        FedConfig(**config)


def test_server_step_is_allowed_where_it_is_post_processing() -> None:
    private = FedConfig(server_step=0.0, dp="slide-dpsgd", dp_epsilon=8.0)  # each site's update is private already
    summed = FedConfig(server_step=3.0, secagg=True)  # a fixed number needs no site's weight
    assert [create_strategy(cfg).server_step for cfg in (private, summed)] == [0.0, 3.0]
