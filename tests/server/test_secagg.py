"""SecAgg+ on the FedAvg path (wsi_fl.server.secagg): the real ClientApp and SecAggPlusWorkflow on small HDF5 sites.

The updates each site computed are kept by the site's own train handler (before Flower's ``secaggplus_mod`` masks
them), so the secure mean can be checked against FedAvg of exactly those updates, and what the server received
against what the sites held.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pytest
import torch
from bagsites import DIM, history
from flwr.app import Context, Message, MessageType
from flwr.clientapp import ClientApp
from flwr.common import bytes_to_ndarray
from flwr.common.secure_aggregation.quantization import quantize
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key

from models import create_model
from models.checkpoint import load_checkpoint
from wsi_fl.cli import main
from wsi_fl.engines.inline import InlineGrid
from wsi_fl.federation import arrays as fedarrays
from wsi_fl.federation.config import FedConfig
from wsi_fl.server.loop import run_server
from wsi_fl.server.secagg import (
    check_secagg_config,
    max_weight_for,
    quantisation_bound,
    run_secagg_server,
)
from wsi_fl.site.app import evaluate, make_client_app, query, train
from wsi_fl.site.secagg import secagg_mod

SMALL = {"hidden_dim": 32, "attn_dim": 16, "lr": 2e-3, "test_frac": 0.3, "val_frac": 0.2, "min_available_nodes": 3}
U32 = float(np.finfo(np.float32).eps) / 2  # float32 unit roundoff: checkpoints hold float32 weights

Updates = dict[int, tuple[dict[str, np.ndarray], int]]  # node -> (the model it trained, its training bags)


def recording_app(cohort: Path, updates: Updates) -> ClientApp:
    """A SecAgg+ ClientApp whose train handler also keeps what it trained (the masks come after, in the mod)."""

    def keep(msg: Message, context: Context) -> Message:
        reply = train(msg, context, cohort)
        updates[context.node_id] = (fedarrays.to_numpy(reply.content["arrays"]),
                                    int(reply.content["metrics"]["num-examples"]))
        return reply

    app = ClientApp(mods=[secagg_mod])
    app.train()(keep)
    app.evaluate()(lambda msg, context: evaluate(msg, context, cohort))
    app.query()(lambda msg, context: query(msg, context, cohort))
    return app


def sites(app: ClientApp, faults=None) -> InlineGrid:
    return InlineGrid(app, [{"partition-id": i} for i in range(3)], faults=faults)


def fed(tmp_path: Path, name: str, **kw) -> FedConfig:
    return FedConfig(**{**SMALL, "num_server_rounds": 1, "out_dir": str(tmp_path / name), **kw})



def weights(path: Path) -> dict[str, np.ndarray]:
    model, _ = load_checkpoint(path)
    return {k: v.numpy() for k, v in model.state_dict().items()}


def fedavg(updates: Updates, nodes: Iterable[int]) -> dict[str, np.ndarray]:
    """Plain FedAvg of the sites' models, in float64: sum(w x) / sum(w)."""
    chosen = [updates[n] for n in nodes]
    total = sum(n for _, n in chosen)
    return {k: sum(n * u[k].astype(np.float64) for u, n in chosen) / total for k in chosen[0][0]}


def gap_and_bound(mean: dict[str, np.ndarray], updates: Updates, nodes: list[int], cfg: FedConfig,
                  max_weight: float) -> tuple[float, float]:
    """(largest |secure - FedAvg|, its bound from the quantisation parameters and the float32 checkpoint)."""
    ref = fedavg(updates, nodes)
    gap = max(float(np.abs(mean[k] - ref[k]).max()) for k in ref)
    spread = max(float(np.abs(updates[n][0][k] - ref[k]).max()) for n in nodes for k in ref)
    largest = max(float(np.abs(v).max()) for v in ref.values())
    bound = quantisation_bound([updates[n][1] for n in nodes], max_weight, cfg.secagg_clipping_range,
                               cfg.secagg_quantization_range, spread) + U32 * largest
    return gap, bound


@pytest.fixture(scope="module")
def secure_round(cohort, tmp_path_factory) -> tuple[InlineGrid, Updates, FedConfig]:
    """One SecAgg+ round of three sites; the grid keeps every reply the server received."""
    updates: Updates = {}
    grid = sites(recording_app(cohort, updates))
    cfg = fed(tmp_path_factory.mktemp("secure"), "run", secagg=True)
    run_secagg_server(grid, cfg)
    return grid, updates, cfg


# -- (a) the aggregate -------------------------------------------------------------------------------------------

def test_secure_mean_is_fedavg_of_the_same_updates_up_to_quantisation(cohort, secure_round, tmp_path):
    _, updates, cfg = secure_round
    out = Path(cfg.out_dir)
    assert history(out)[0]["aggregated"] == 3 and sorted(updates) == [1, 2, 3]
    sizes = [n for _, n in updates.values()]
    gap, bound = gap_and_bound(weights(out / "last.pt"), updates, [1, 2, 3], cfg, max_weight_for(sizes))
    assert bound < 3e-5  # 3 sites of 5-7 bags, max weight 8: about 3 quantisation steps of 16 / 2**22
    assert 0.1 * bound < gap <= bound  # within the bound, and the bound is not loose: the gap is quantisation
    # The plain path trains the very same updates: its FedAvg is the reference up to float32 rounding.
    run_server(InlineGrid(make_client_app(cohort), [{"partition-id": i} for i in range(3)]), fed(tmp_path, "plain"))
    ref, plain = fedavg(updates, [1, 2, 3]), weights(tmp_path / "plain" / "last.pt")
    assert max(float(np.abs(plain[k] - ref[k]).max()) for k in ref) <= 1e-6


def test_a_site_lost_after_key_sharing_is_unmasked_away(cohort, tmp_path):
    """Site 3 never uploads its masked model: the others' shares remove its pairwise masks; two lost: no mean."""

    def silent_at_upload(reply: Message, rnd: int) -> Message | None:
        uploading = reply.metadata.message_type == MessageType.TRAIN and not reply.has_error() \
            and Key.MASKED_PARAMETERS in reply.content.config_records.get(RECORD_KEY_CONFIGS, {})
        return None if uploading else reply

    updates: Updates = {}
    cfg = fed(tmp_path, "one-lost", secagg=True, round_timeout=5.0)
    run_secagg_server(sites(recording_app(cohort, updates), faults={3: silent_at_upload}), cfg)
    row = history(tmp_path / "one-lost")[0]
    assert (row["sampled"], row["aggregated"], row["failed"]) == (3, 2, 1)
    gap, bound = gap_and_bound(weights(tmp_path / "one-lost" / "last.pt"), updates, [1, 2], cfg,
                               max_weight_for([n for _, n in updates.values()]))
    assert gap <= bound

    two_lost = fed(tmp_path, "two-lost", secagg=True, round_timeout=5.0)
    run_secagg_server(sites(make_client_app(cohort), faults={2: silent_at_upload, 3: silent_at_upload}),
                      two_lost)
    assert history(tmp_path / "two-lost")[0]["aggregated"] == 0
    torch.manual_seed(two_lost.seed)  # the global model stays the initial one
    initial = create_model(two_lost.mil_config(DIM, 2)).state_dict()
    assert all(np.array_equal(initial[k].numpy(), v) for k, v in weights(tmp_path / "two-lost" / "last.pt").items())


# -- (b) training ------------------------------------------------------------------------------------------------

def test_secagg_training_converges_as_fedavg_does(cohort, tmp_path):
    run_secagg_server(sites(make_client_app(cohort)), fed(tmp_path, "secure", num_server_rounds=8,
                                                                 secagg=True))
    run_server(InlineGrid(make_client_app(cohort), [{"partition-id": i} for i in range(3)]),
               fed(tmp_path, "plain", num_server_rounds=8))
    secure, plain = history(tmp_path / "secure"), history(tmp_path / "plain")
    assert all(r["aggregated"] == 3 for r in secure)
    assert secure[-1]["val-loss"] < secure[0]["val-loss"] and secure[-1]["test-auc"] >= 0.8
    for s, p in zip(secure, plain, strict=True):  # ~1e-5 of quantisation noise per weight: loss gaps ~1e-6
        assert s["val-loss"] == pytest.approx(p["val-loss"], abs=1e-4)
        assert s["test-auc"] == pytest.approx(p["test-auc"], abs=0.05)


def test_fedadam_server_step_runs_on_the_secure_mean_and_resumes(cohort, tmp_path):
    """FedAdam needs only the mean: its moments follow plain FedAdam's, and survive a server restart."""
    grid = sites(make_client_app(cohort))
    run_secagg_server(grid, fed(tmp_path, "secure", strategy="fedadam", secagg=True))
    run_secagg_server(grid, fed(tmp_path, "secure", num_server_rounds=3, strategy="fedadam", secagg=True,
                                resume=True))
    run_server(InlineGrid(make_client_app(cohort), [{"partition-id": i} for i in range(3)]),
               fed(tmp_path, "plain", num_server_rounds=3, strategy="fedadam"))
    assert [r["round"] for r in history(tmp_path / "secure")] == [1, 2, 3]
    secure, plain = weights(tmp_path / "secure" / "last.pt"), weights(tmp_path / "plain" / "last.pt")
    assert max(float(np.abs(secure[k] - plain[k]).max()) for k in plain) < 1e-4  # measured ~1e-5 after 3 rounds
    assert "m_t" in torch.load(tmp_path / "secure" / "state.pt", weights_only=False)["strategy"]


@pytest.mark.slow
def test_simulation_engine_runs_secagg_end_to_end(cohort, tmp_path, capsys):
    """`wsi-fl federate --secagg true` on Flower's simulation engine (Ray): the numbers of the in-process grid."""
    out = tmp_path / "sim"
    args = ["federate", "--cohort", str(cohort), "--out", str(out), "--num-server-rounds", "2", "--secagg", "true",
            "--hidden-dim", "32", "--attn-dim", "16", "--lr", "0.002", "--test-frac", "0.3", "--val-frac", "0.2",
            "--min-available-nodes", "3"]
    assert main(args) == 0
    assert "federated fedavg: 2 rounds" in capsys.readouterr().out
    run_secagg_server(sites(make_client_app(cohort)), fed(tmp_path, "inline", num_server_rounds=2,
                                                                 secagg=True))
    for a, b in zip(history(out), history(tmp_path / "inline"), strict=True):
        assert a["aggregated"] == 3
        assert a["val-loss"] == pytest.approx(b["val-loss"], abs=1e-4)


# -- (c) what the server sees ------------------------------------------------------------------------------------

def test_the_server_receives_only_masked_vectors(secure_round):
    grid, updates, cfg = secure_round
    q = cfg.secagg_quantization_range
    train_replies = [r for r in grid.sent if r.metadata.message_type == MessageType.TRAIN]
    assert train_replies and not any(len(record) for r in train_replies for record in r.content.array_records.values())
    uploads = {r.metadata.src_node_id: r for r in train_replies
               if Key.MASKED_PARAMETERS in r.content.config_records[RECORD_KEY_CONFIGS]}
    assert sorted(uploads) == [1, 2, 3]
    max_weight = max_weight_for([n for _, n in updates.values()])
    for node, reply in uploads.items():
        assert set(reply.content.config_records.keys()) == {"fitres.metrics", "fitres.status", RECORD_KEY_CONFIGS}
        assert set(reply.content["fitres.metrics"].keys()) == {"train-loss"}  # the only plaintext besides the count
        model, n = updates[node]
        site = np.concatenate([a.ravel() for a in model.values()]) * (n / max_weight)
        masked = np.concatenate([bytes_to_ndarray(b).ravel() for b in
                                 reply.content.config_records[RECORD_KEY_CONFIGS][Key.MASKED_PARAMETERS][1:]])
        unmasked = quantize([site], cfg.secagg_clipping_range, q)[0]
        assert unmasked.max() <= q and np.corrcoef(unmasked, site)[0, 1] > 0.999  # what masking hides
        assert (masked >= q).mean() > 0.99  # uniform over [0, 2**32): almost never inside the quantised range
        assert abs(np.corrcoef(masked.astype(np.float64), site)[0, 1]) < 0.1


def test_the_mod_leaves_the_plain_path_unchanged(cohort, tmp_path):
    """Installed always (the server picks the path per run): a plain run with the mod gives the same model."""
    run_server(sites(make_client_app(cohort)), fed(tmp_path, "with-mod"))
    run_server(InlineGrid(make_client_app(cohort), [{"partition-id": i} for i in range(3)]), fed(tmp_path, "plain"))
    with_mod, plain = weights(tmp_path / "with-mod" / "last.pt"), weights(tmp_path / "plain" / "last.pt")
    assert all(np.array_equal(with_mod[k], plain[k]) for k in plain)


# -- (d) configuration -------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("settings", "message"), [
    ({"strategy": "fedmedian"}, "secagg = true needs strategy fedavg, fedprox, fedadam, fedyogi .*not 'fedmedian'"),
    ({"strategy": "fedtrimmedavg"}, "not 'fedtrimmedavg'"),
    ({"dp": "client-fixed", "dp_noise_multiplier": 1.0}, "cannot be combined with dp = 'client-fixed'"),
    ({"min_train_nodes": 1}, "needs min-train-nodes >= 2"),
    ({"secagg_quantization_range": 2**32}, "secagg-quantization-range in"),
])
def test_secagg_config_errors_are_one_line(settings, message):
    with pytest.raises(ValueError, match=message) as err:
        check_secagg_config(FedConfig(secagg=True, **settings))
    assert "\n" not in str(err.value)
    check_secagg_config(FedConfig(secagg=False, **settings))  # the plain path is not concerned


def test_federate_refuses_secagg_with_fedmedian_before_starting(cohort, tmp_path, capsys):
    code = main(["federate", "--cohort", str(cohort), "--out", str(tmp_path / "o"), "--secagg", "true",
                 "--strategy", "fedmedian"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and "not 'fedmedian'" in err
    assert not (tmp_path / "o").exists()
