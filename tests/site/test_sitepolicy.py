"""A site's policy: the file format, every rule refusing an instruction outside it, and the real ClientApp obeying.

Instructions are real Flower messages delivered to the real ClientApp by the
in-process grid (:mod:`wsi_fl.engines.inline`); a refusal is the error reply the
server would log, and a whole federation goes on without a site that refuses.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import tomli_w
from bagsites import DIM, make_cohort, make_site
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.common.constant import ErrorCode

from models import create_model, list_models
from models.checkpoint import load_checkpoint
from wsi_fl.engines import deployment
from wsi_fl.engines.inline import InlineGrid
from wsi_fl.federation import arrays as fedarrays
from wsi_fl.federation.config import FedConfig
from wsi_fl.server.loop import client_config, run_server
from wsi_fl.server.strategies import list_strategies
from wsi_fl.site import guard as siteguard
from wsi_fl.site.app import make_client_app
from wsi_fl.site.policy import (
    PolicyError,
    PolicyViolation,
    SiteFacts,
    SitePolicy,
    check_instruction,
    load_policy,
    rehearsal_policy,
    suppress_small_splits,
)

ROOT = Path(__file__).resolve().parents[2]
SMALL = {"hidden_dim": 32, "attn_dim": 16, "lr": 2e-3, "test_frac": 0.3, "val_frac": 0.2, "auc_bins": 20}


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("site")
    make_site(root, "site_a", 14, 0)
    return root / "site_a"


def write_policy(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def node(site: Path, policy: Path | None, tmp: Path, **extra: str) -> dict[str, str]:
    config = {"data-path": str(site / "features"), "labels": str(site / "labels.csv"),
              "audit-log": str(tmp / "audit.jsonl"), **extra}
    if policy is not None:
        config["policy"] = str(policy)
    return config


def instruction(kind: str, cfg: FedConfig, server_round: int = 1) -> Message:
    """What the server sends: the settings (classes after the query) and, to train or evaluate, the global model."""
    config = client_config(cfg, None if kind == MessageType.QUERY else ["0", "1"])
    config["server-round"] = server_round
    content: dict = {"config": config}
    if kind != MessageType.QUERY:
        content["arrays"] = fedarrays.to_record(create_model(cfg.mil_config(DIM, 2)).state_dict())
    return Message(content=RecordDict(content), message_type=kind, dst_node_id=1)


def deliver(node_config: dict, kind: str, cfg: FedConfig, server_round: int = 1) -> Message:
    grid = InlineGrid(make_client_app(), [node_config])  # sets Flower's task identity before the message is made
    return next(iter(grid.send_and_receive([instruction(kind, cfg, server_round)])))


# -- the file ----------------------------------------------------------------------------------------------------

def test_policy_file_round_trips_and_defaults_are_the_safe_ones(tmp_path):
    text = """allowed-models = ["gated_attention", "attention"]
allowed-strategies = ["fedavg", "fedprox"]
min-train-bags = 20
max-rounds = 200
require-dp = true
min-noise-multiplier = 1
allow-site-metrics = true
min-eval-slides = 15
superlink = "fl.example.org:9092"
"""
    policy = load_policy(write_policy(tmp_path / "p.toml", text))
    assert policy == SitePolicy(allowed_models=("gated_attention", "attention"),
                                allowed_strategies=("fedavg", "fedprox"), min_train_bags=20, max_rounds=200,
                                require_dp=True, min_noise_multiplier=1.0,
                                allow_site_metrics=True, min_eval_slides=15, superlink=("fl.example.org:9092",))
    assert load_policy(write_policy(tmp_path / "q.toml", tomli_w.dumps(policy.to_dict()))) == policy
    assert load_policy(write_policy(tmp_path / "empty.toml", "")) == SitePolicy()
    default = SitePolicy()
    assert default.allowed_models == tuple(list_models()) and default.allowed_strategies == tuple(list_strategies())
    assert default.min_train_bags == 10 and default.min_eval_slides == 10 and default.max_rounds == 500
    assert not default.allow_site_metrics and not default.require_dp and default.superlink == ()
    assert rehearsal_policy().min_train_bags == 1 and rehearsal_policy().allow_site_metrics


@pytest.mark.parametrize(("text", "message"), [
    ("min-train-bag = 3\n", "unknown key 'min-train-bag'"),
    ("min_train_bags = 3\n", "unknown key 'min_train_bags'"),
    ('min-train-bags = "ten"\n', "min-train-bags must be int, not 'ten'"),
    ("allow-site-metrics = 1\n", "allow-site-metrics must be bool, not 1"),
    ("superlink = 9092\n", "superlink must be a list of non-empty strings"),
    ('allowed-models = ["gated_attention", 3]\n', "allowed-models must be a list of non-empty strings"),
    ('allowed-models = ["transformer"]\n', "allowed-models: 'transformer' is not registered"),
    ("allowed-strategies = []\n", "allowed-strategies must name at least one"),
    ("min-noise-multiplier = 0.5\n", "min-noise-multiplier > 0 needs require-dp = true"),
    ("max-rounds = 0\n", "max-rounds must be >= 1"),
    ("min-train-bags = [\n", "not valid TOML"),
])
def test_bad_policy_file_is_a_one_line_error_naming_file_and_key(tmp_path, text, message):
    path = write_policy(tmp_path / "policy.toml", text)
    with pytest.raises(PolicyError, match=message) as err:
        load_policy(path)
    assert str(err.value).startswith(f"{path}: ") and "\n" not in str(err.value)
    with pytest.raises(PolicyError, match=f"{tmp_path / 'missing.toml'}: cannot read"):
        load_policy(tmp_path / "missing.toml")


# -- every rule, at the function ---------------------------------------------------------------------------------

def settings(**kw) -> dict:
    return FedConfig(**kw).to_run_config()


def test_check_instruction_rules():
    ok = SiteFacts(train_bags=50, superlink="fl:1")
    check_instruction(SitePolicy(), "train", settings(), ok)
    check_instruction(SitePolicy(), "train.default", settings(), ok)  # Flower's "<type>.<action>" form
    with pytest.raises(PolicyViolation, match="message type 'export' is not one this site answers"):
        check_instruction(SitePolicy(), "export", {}, ok)
    # A setting left out is checked at the value the site would use (FedConfig's default), not skipped.
    with pytest.raises(PolicyViolation, match="model 'gated_attention' is not allowed"):
        check_instruction(SitePolicy(allowed_models=("attention",)), "query", {}, ok)
    with pytest.raises(PolicyViolation, match="server-round 9 exceeds max-rounds 8"):
        check_instruction(SitePolicy(max_rounds=8), "train", {**settings(num_server_rounds=8), "server-round": 9}, ok)
    with pytest.raises(PolicyViolation, match="does not name the SuperLink"):
        check_instruction(SitePolicy(superlink=("fl:1",)), "query", {}, SiteFacts())
    with pytest.raises(PolicyViolation, match="'lots' is not a number"):
        check_instruction(SitePolicy(), "query", {"num-server-rounds": "lots"}, ok)
    check_instruction(SitePolicy(min_train_bags=50), "train", {}, ok)  # exactly the minimum trains
    with pytest.raises(PolicyViolation, match="49 training bags, fewer than min-train-bags 50"):
        check_instruction(SitePolicy(min_train_bags=50), "train", {}, SiteFacts(train_bags=49))


def test_secagg_fit_settings_are_checked_and_its_protocol_stages_get_the_settings_free_rules():
    narrow = SitePolicy(allowed_models=("attention",), superlink=("fl:1",))
    check_instruction(narrow, "train", None, SiteFacts(superlink="fl:1"))  # a key set-up stage: no settings
    with pytest.raises(PolicyViolation, match="SuperLink x:2 is not allowed"):
        check_instruction(narrow, "train", None, SiteFacts(superlink="x:2"))
    InlineGrid(make_client_app(), [{}])  # sets Flower's task identity for the messages below
    fit = Message(RecordDict({"fitins.config": ConfigRecord({"model": "gated_attention"}),
                              "secaggplus": ConfigRecord({"stage": "fit"})}), message_type="train", dst_node_id=1)
    assert siteguard.instruction_settings(fit)["model"] == "gated_attention"
    with pytest.raises(PolicyViolation, match="model 'gated_attention' is not allowed"):
        check_instruction(narrow, "train", siteguard.instruction_settings(fit), SiteFacts(superlink="fl:1"))
    setup = Message(RecordDict({"secaggplus": ConfigRecord({"stage": "setup"})}), message_type="train",
                    dst_node_id=1)
    assert siteguard.instruction_settings(setup) is None


def test_small_splits_are_reported_empty():
    metrics = {"val-n": 3, "val-loss-sum": 1.2, "val-hist": [1, 0, 2, 0], "val-confusion": [1, 1, 0, 1],
               "test-n": 12, "test-loss-sum": 4.0, "test-hist": [5, 1, 2, 4], "test-confusion": [5, 1, 2, 4],
               "num-examples": 15}
    out, suppressed = suppress_small_splits(metrics, 10)
    assert suppressed == ["val"] and out["val-n"] == 0 and out["val-loss-sum"] == 0.0
    assert out["val-hist"] == [0] * 4 and out["val-confusion"] == [0] * 4 and out["num-examples"] == 12
    assert out["test-hist"] == metrics["test-hist"]
    assert suppress_small_splits(metrics, 3) == (metrics, [])


# -- every rule, through the real ClientApp ----------------------------------------------------------------------

@dataclass(frozen=True)
class Case:
    """One rule: an instruction it refuses (with ``reason``) and one it accepts, each (policy, settings, node)."""

    kind: str
    reason: str
    refused: tuple[str, dict, dict]
    accepted: tuple[str, dict, dict] = field(default=("", {}, {}))


DP = {"dp": "server-fixed", "dp_noise_multiplier": 1.0}
CASES = {
    "allowed-models": Case(MessageType.QUERY, "model 'gated_attention' is not allowed (allowed-models: attention)",
                           ('allowed-models = ["attention"]', {}, {}),
                           ('allowed-models = ["attention"]', {"model": "attention"}, {})),
    "allowed-strategies": Case(MessageType.TRAIN, "strategy 'fedavg' is not allowed",
                               ('allowed-strategies = ["fedprox"]\nmin-train-bags = 1', {}, {}),
                               ('allowed-strategies = ["fedprox"]\nmin-train-bags = 1', {"strategy": "fedprox"}, {})),
    "max-rounds": Case(MessageType.QUERY, "num-server-rounds 6 exceeds max-rounds 5",
                       ("max-rounds = 5", {"num_server_rounds": 6}, {}),
                       ("max-rounds = 5", {"num_server_rounds": 5}, {})),
    "server-round": Case(MessageType.QUERY, "server-round 6 exceeds max-rounds 5",
                         ("max-rounds = 5", {"num_server_rounds": 5, "server-round": 6}, {}),
                         ("max-rounds = 5", {"num_server_rounds": 5, "server-round": 5}, {})),
    "require-dp": Case(MessageType.QUERY, "not differentially private (dp = 'none')",
                       ("require-dp = true", {}, {}), ("require-dp = true", DP, {})),
    "min-noise-multiplier": Case(MessageType.QUERY, "dp-noise-multiplier 0.5 is below min-noise-multiplier 0.8",
                                 ("require-dp = true\nmin-noise-multiplier = 0.8", {**DP, "dp_noise_multiplier": 0.5},
                                  {}), ("require-dp = true\nmin-noise-multiplier = 0.8", DP, {})),
    "min-train-bags": Case(MessageType.TRAIN, "fewer than min-train-bags 1000",
                           ("min-train-bags = 1000", {}, {}), ("min-train-bags = 2", {}, {})),
    "allow-site-metrics": Case(MessageType.EVALUATE, "allow-site-metrics is false",
                               ("allow-site-metrics = false", {}, {}), ("allow-site-metrics = true", {}, {})),
    "superlink": Case(MessageType.QUERY, "SuperLink evil.example.org:9092 is not allowed",
                      ('superlink = ["fl.example.org:9092"]', {}, {"superlink": "evil.example.org:9092"}),
                      ('superlink = ["fl.example.org:9092"]', {}, {"superlink": "fl.example.org:9092"})),
    "superlink-unknown": Case(MessageType.QUERY, "node config does not name the SuperLink (set superlink)",
                              ('superlink = ["fl.example.org:9092"]', {}, {})),
}


def run_case(site: Path, tmp: Path, kind: str, policy_text: str, overrides: dict, extra: dict) -> Message:
    overrides = dict(overrides)
    server_round = overrides.pop("server-round", 1)
    policy = write_policy(tmp / "policy.toml", policy_text)
    return deliver(node(site, policy, tmp, **extra), kind, FedConfig(**{**SMALL, **overrides}), server_round)


@pytest.mark.parametrize("rule", list(CASES))
def test_each_rule_refuses_outside_and_accepts_inside(site, tmp_path, caplog, rule):
    case = CASES[rule]
    with caplog.at_level(logging.WARNING, logger="wsi_fl.site"):
        reply = run_case(site, tmp_path, case.kind, *case.refused)
    assert reply.has_error()
    assert case.reason in reply.error.reason
    assert reply.error.reason.startswith("PolicyViolation: site policy: ") and "\n" not in reply.error.reason
    assert any(case.reason in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)
    lines = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert [e["event"] for e in lines] == ["received", "refused"] and case.reason in lines[1]["reason"]
    if case.accepted[0]:
        reply = run_case(site, tmp_path, case.kind, *case.accepted)
        assert not reply.has_error(), reply.error.reason


def test_evaluation_of_small_splits_is_suppressed(site, tmp_path):
    cfg = FedConfig(**SMALL)
    policy = write_policy(tmp_path / "p.toml", "allow-site-metrics = true\nmin-eval-slides = 1000\n")
    metrics = deliver(node(site, policy, tmp_path), MessageType.EVALUATE, cfg).content["metrics"]
    assert metrics["val-n"] == metrics["test-n"] == 0 and sum(metrics["test-hist"]) == 0
    assert json.loads((tmp_path / "audit.jsonl").read_text().splitlines()[-1])["suppressed"] == ["val", "test"]
    write_policy(policy, "allow-site-metrics = true\nmin-eval-slides = 2\n")  # an edit applies to the next message
    metrics = deliver(node(site, policy, tmp_path), MessageType.EVALUATE, cfg).content["metrics"]
    assert metrics["test-n"] >= 2 and sum(metrics["test-hist"]) == metrics["test-n"]


def test_default_policy_without_a_policy_file_is_the_safe_one(site, tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(siteguard, "_announced", set())
    cfg = FedConfig(**SMALL)
    with caplog.at_level(logging.INFO, logger="wsi_fl.site"):
        assert not deliver(node(site, None, tmp_path), MessageType.QUERY, cfg).has_error()
        train = deliver(node(site, None, tmp_path), MessageType.TRAIN, cfg)
        evaluate = deliver(node(site, None, tmp_path), MessageType.EVALUATE, cfg)
    assert "fewer than min-train-bags 10" in train.error.reason  # a 14-slide site trains on fewer than 10
    assert "allow-site-metrics is false" in evaluate.error.reason
    announced = [r for r in caplog.records if "no site policy in the node config" in r.getMessage()]
    assert len(announced) == 1, "logged once, not per message"


def test_broken_policy_file_refuses_everything_without_naming_the_file(site, tmp_path, caplog):
    policy = write_policy(tmp_path / "hospital-policy.toml", "max-round = 3\n")
    with caplog.at_level(logging.ERROR, logger="wsi_fl.site"):
        reply = deliver(node(site, policy, tmp_path), MessageType.QUERY, FedConfig(**SMALL))
    assert reply.has_error() and "PolicyError at the site" in reply.error.reason
    assert "hospital-policy" not in reply.error.reason and str(tmp_path) not in reply.error.reason
    assert any("unknown key 'max-round'" in r.getMessage() or (r.exc_info and "max-round" in str(r.exc_info[1]))
               for r in caplog.records)  # the site's own log says what is wrong


# -- a federation with a site that refuses -----------------------------------------------------------------------

def test_federation_goes_on_without_the_site_that_refuses(tmp_path, caplog):
    make_cohort(tmp_path / "cohort", sizes=(10, 12, 14))
    policy = write_policy(tmp_path / "policy.toml", 'allowed-strategies = ["fedprox"]\n')
    nodes = [{"partition-id": 0}, {"partition-id": 1}, {"partition-id": 2, "policy": str(policy)}]
    grid = InlineGrid(make_client_app(tmp_path / "cohort"), nodes)
    cfg = FedConfig(**{**SMALL, "num_server_rounds": 2, "min_available_nodes": 2, "min_train_nodes": 2,
                       "min_evaluate_nodes": 2, "out_dir": str(tmp_path / "run")})
    with caplog.at_level(logging.WARNING, logger="wsi_fl.server"):
        result = run_server(grid, cfg)
    assert result.rounds_completed == 2
    rows = result.history
    assert all(r["aggregated"] == 2 and r["failed"] == 1 and r["eval-replies"] == 2 for r in rows)
    server_log = [r.getMessage() for r in caplog.records if r.name == "wsi_fl.server"]
    reason = "PolicyViolation: site policy: strategy 'fedavg' is not allowed (allowed-strategies: fedprox)"
    assert any(m.startswith("site 3 could not describe its data") and reason in m for m in server_log)
    assert any(m.startswith("site 3 failed this round") and reason in m for m in server_log)
    assert any(m.startswith("site 3 failed to evaluate") and reason in m for m in server_log)


# -- the local deployment passes superlink, policy and audit-log, and refuses a SuperLink the policy does not allow

def test_local_federation_gives_each_supernode_its_policy_and_refuses_a_disallowed_superlink(tmp_path):
    written = deployment.site_policy(None, "127.0.0.1:4242", tmp_path)
    assert load_policy(written) == SitePolicy(min_train_bags=1, min_eval_slides=1, allow_site_metrics=True,
                                              allow_survival_histograms=True, superlink=("127.0.0.1:4242",))
    config = deployment.node_config(tmp_path / "f", tmp_path / "l.csv", "site_1", superlink="127.0.0.1:4242",
                                    policy=str(written), audit_log=str(tmp_path / "a.jsonl"))
    assert f"superlink='127.0.0.1:4242' policy='{written}' audit-log='{tmp_path / 'a.jsonl'}'" in config
    make_cohort(tmp_path / "cohort", sizes=(6, 6))
    own = write_policy(tmp_path / "own.toml", 'superlink = ["fl.example.org:9092"]\n')
    with pytest.raises(ValueError, match=r"SuperLink 127\.0\.0\.1:\d+ is not allowed .*no SuperNode started"):
        deployment.rehearse(tmp_path / "cohort", tmp_path / "out", 1, workdir=tmp_path / "work", policy=own)
    assert not list((tmp_path / "work" / "logs").glob("*.log")), "no process was started"


# -- a refusal is one line at the site, not Flower's traceback -----------------------------------------------------

def test_a_refusal_is_answered_not_raised_so_flower_logs_no_traceback(site, tmp_path, caplog):
    """Flower's runtimes (``run_clientapp`` in deployment, the simulation engine) log any exception escaping a
    ClientApp with its traceback, and in deployment end the app process with "Exit Code: 800". A refusal is the
    site's decision: the ClientApp returns it as an error reply, logged in one line that names the rule."""
    policy = write_policy(tmp_path / "p.toml", 'allowed-strategies = ["fedprox"]\n')
    app = make_client_app()
    InlineGrid(app, [])  # Flower's task identity, which a Message needs
    context = Context(run_id=1, node_id=1, node_config=node(site, policy, tmp_path), state=RecordDict(),
                      run_config={})
    with caplog.at_level(logging.INFO, logger="wsi_fl"):
        reply = app(instruction(MessageType.TRAIN, FedConfig(**SMALL)), context)  # as Flower calls it; no raise
    assert reply.has_error() and reply.error.code == ErrorCode.MOD_FAILED_PRECONDITION
    assert reply.error.reason == ("PolicyViolation: site policy: strategy 'fedavg' is not allowed "
                                  "(allowed-strategies: fedprox)")
    said = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(said) == 1 and not said[0].exc_info
    assert said[0].getMessage() == ("refused the train instruction of run 1, round 1: site policy: strategy "
                                    "'fedavg' is not allowed (allowed-strategies: fedprox)")


@pytest.mark.slow
def test_in_a_deployment_a_refusal_is_one_line_at_the_site_and_a_reason_at_the_server(tmp_path):
    """Flower's deployment runtime on loopback (a SuperLink, two SuperNodes, ``flwr run``; one round): both sites'
    policy refuses evaluation. Each site logs one line per refusal, no traceback and no "Exit Code: 800"; the
    server logs the reason; the run completes; and the checkpoint records the split (no slide id)."""
    make_cohort(tmp_path / "cohort", sizes=(8, 8))
    policy = write_policy(tmp_path / "policy.toml", "min-train-bags = 1\nmin-eval-slides = 1\n")
    result = deployment.rehearse(tmp_path / "cohort", tmp_path / "out", 1, workdir=tmp_path / "work", timeout=600,
                                 insecure=True, policy=policy,
                                 run_config="hidden-dim=16 attn-dim=8 min-evaluate-nodes=1 test-frac=0.25")
    logs = {p.name: p.read_text(errors="replace") for p in Path(result["logs"]).glob("*.log")}
    assert result["ok"], "\n".join(f"== {k}\n{v[-3000:]}" for k, v in logs.items())
    at_sites = "\n".join(v for k, v in logs.items() if k != "superlink.log" and k != "flwr-run.log")
    refused = [line for line in at_sites.splitlines() if "refused the evaluate instruction" in line]
    assert len(refused) == 2, at_sites
    assert all(line.endswith("site policy: allow-site-metrics is false: this site does not report evaluation "
                              "metrics") for line in refused), refused
    # what Flower's run_clientapp logs for an exception escaping the ClientApp (the traceback follows it)
    assert "ClientApp raised an exception" not in at_sites and "Exit Code: 800" not in at_sites, at_sites
    assert logs["flwr-run.log"].count("failed to evaluate: PolicyViolation: site policy: allow-site-metrics is "
                                      "false") == 2
    _, ckpt = load_checkpoint(tmp_path / "out" / "best.pt")
    assert ckpt.meta["splits"]["test_frac"] == 0.25 and ckpt.meta["splits"]["sites"] == []
