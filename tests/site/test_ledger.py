"""The site's privacy ledger: ε per dataset across runs, a lifetime budget, crash safety, and the real ClientApp
refusing a second run over budget before it trains."""

from __future__ import annotations

import json
import multiprocessing
import subprocess
import sys
from pathlib import Path

import pytest
from bagsites import history
from flwr.app import MessageType
from flwr.supercore.task_identity import TaskIdentity

from wsi_fl.engines.inline import InlineGrid
from wsi_fl.federation.config import FedConfig
from wsi_fl.privacy import dpsgd
from wsi_fl.server.loop import FederationError, run_server
from wsi_fl.site.app import make_client_app
from wsi_fl.site.data import SiteConfigError
from wsi_fl.site.ledger import LEDGER_FILE, UNUSABLE, PrivacyLedger, admit_run, node_dataset, node_ledger
from wsi_fl.site.policy import PolicyError, PolicyViolation, SitePolicy, load_policy

ROOT = Path(__file__).resolve().parents[2]
DATA = "/hospital/features"


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# -- the file ----------------------------------------------------------------------------------------------------

def test_a_run_within_budget_is_admitted_and_charged_once(tmp_path):
    ledger = PrivacyLedger(tmp_path / "ledger.jsonl")
    assert ledger.admit(DATA, 7, 2.0, 1e-5, 5.0, charge=False).runs == 0  # the run's query: checked, not charged
    assert ledger.charges() == []
    account = ledger.admit(DATA, 7, 2.0, 1e-5, 5.0, charge=True, details={"rounds": 3})
    assert (account.epsilon, account.delta, account.runs) == (2.0, 1e-5, 1)
    for _ in range(3):  # its later rounds, and its query again: admitted, never charged twice
        assert ledger.admit(DATA, 7, 2.0, 1e-5, 5.0, charge=True).runs == 1
    [entry] = lines(ledger.path)
    assert entry["dataset"] == DATA and entry["run-id"] == 7 and entry["epsilon"] == 2.0 and entry["rounds"] == 3
    assert ledger.path.stat().st_mode & 0o777 == 0o600
    # Another dataset has its own account.
    assert ledger.admit("/other/features", 8, 4.5, 1e-5, 5.0, charge=True).epsilon == 4.5
    assert ledger.account(DATA).epsilon == 2.0


def test_a_second_run_over_budget_is_refused_after_a_restart_in_a_new_process(tmp_path):
    path = tmp_path / "ledger.jsonl"
    PrivacyLedger(path).admit(DATA, 1, 3.0, 1e-5, 5.0, charge=True)
    # The site restarts: a new process reads the same file, nothing carried over in memory.
    script = ("import sys\nfrom wsi_fl.site.ledger import PrivacyLedger\n"
              "from wsi_fl.site.policy import PolicyViolation\nledger = PrivacyLedger(sys.argv[1])\n"
              "try:\n    ledger.admit(sys.argv[2], 2, 3.0, 1e-5, 5.0, charge=True)\n"
              "except PolicyViolation as err:\n    print(err)\n    sys.exit(3)\n")
    run = subprocess.run([sys.executable, "-c", script, str(path), DATA], capture_output=True, text=True,
                         cwd=ROOT, timeout=120)
    assert run.returncode == 3, run.stderr
    assert run.stdout.strip() == ("site policy: this run plans epsilon 3, which would exceed lifetime-epsilon 5 "
                                  "for this dataset (spent 3 in 1 earlier run; 2 left)")
    assert [e["run-id"] for e in lines(path)] == [1]  # the refused run is not charged
    # A run that fits what is left is admitted; the sum is then exactly the budget, and nothing more fits.
    assert PrivacyLedger(path).admit(DATA, 3, 2.0, 1e-5, 5.0, charge=True).epsilon == 5.0
    with pytest.raises(PolicyViolation, match=r"spent 5 in 2 earlier runs; 0 left"):
        PrivacyLedger(path).admit(DATA, 4, 0.1, 1e-5, 5.0, charge=False)
    # Without a budget every run is admitted and recorded.
    assert PrivacyLedger(path).admit(DATA, 5, 9.0, 1e-5, 0.0, charge=True).runs == 3


def test_a_torn_last_line_is_ignored_and_dropped_by_the_next_writer(tmp_path, caplog):
    path = tmp_path / "ledger.jsonl"
    PrivacyLedger(path).admit(DATA, 1, 1.0, 1e-5, 0.0, charge=True)
    whole = path.read_bytes()
    path.write_bytes(whole + b'{"time": "2025-01-01", "event": "charge", "dataset": "/hosp')  # a crash mid-write
    assert PrivacyLedger(path).account(DATA).runs == 1
    assert "dropped a last line cut short" in caplog.text
    PrivacyLedger(path).admit(DATA, 2, 1.0, 1e-5, 0.0, charge=True)
    assert path.read_bytes().startswith(whole) and [e["run-id"] for e in lines(path)] == [1, 2]


def test_a_damaged_line_before_the_last_fails_closed(tmp_path, caplog):
    path = tmp_path / "ledger.jsonl"
    path.write_text('{"dataset": "/hospital/features", "run-id": 1, "epsilon": 1.0}\nnot json\n'
                    '{"dataset": "/hospital/features", "run-id": 2, "epsilon": 1.0}\n')
    with pytest.raises(OSError, match=r"line 2 is damaged; no run under slide-dpsgd is admitted"):
        PrivacyLedger(path).account(DATA)
    node = {"privacy-ledger": str(path), "dataset": "crc"}
    config = FedConfig(dp="slide-dpsgd", dp_epsilon=1.0).to_run_config()
    with pytest.raises(PolicyViolation) as err:  # the server reads one line naming no path; the site's log has it
        admit_run(SitePolicy(), "query", 1, config, node, None, None, lambda: 10)
    assert str(err.value) == UNUSABLE and str(path) in caplog.text


def _admit(path: str, run_id: int, queue) -> None:
    try:
        PrivacyLedger(path).admit(DATA, run_id, 2.0, 1e-5, 5.0, charge=True)
        queue.put(run_id)
    except PolicyViolation:
        queue.put(-run_id)


def test_concurrent_admissions_never_overspend(tmp_path):
    """Runs admitted at once by the runner's task processes: the lock makes check-and-charge one step."""
    path = str(tmp_path / "ledger.jsonl")
    fork = multiprocessing.get_context("fork")
    queue = fork.Queue()
    workers = [fork.Process(target=_admit, args=(path, run_id, queue)) for run_id in range(1, 7)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=60)
    outcomes = [queue.get(timeout=5) for _ in workers]
    assert sum(o > 0 for o in outcomes) == 2 and len(lines(Path(path))) == 2  # 2 + 2 <= 5 < 2 + 2 + 2


# -- the rule ----------------------------------------------------------------------------------------------------

def test_admission_rules_and_what_is_charged(tmp_path):
    path = tmp_path / "ledger.jsonl"
    node = {"privacy-ledger": str(path), "site-name": "site_a"}
    budget = SitePolicy(lifetime_epsilon=4.0)
    dp = FedConfig(dp="slide-dpsgd", dp_epsilon=3.0, num_server_rounds=2).to_run_config()
    with pytest.raises(PolicyViolation, match=r"not under slide-level DP \(dp = 'none'\) and the policy sets "
                                              r"lifetime-epsilon 4"):
        admit_run(budget, "query", 1, FedConfig().to_run_config(), node, None, None, lambda: 10)
    admit_run(SitePolicy(), "train", 1, FedConfig().to_run_config(), node, None, None, lambda: 10)  # no DP, no budget
    admit_run(budget, "train", 1, None, node, None, None, lambda: 10)  # a SecAgg+ stage without settings
    assert not path.exists()
    with pytest.raises(PolicyViolation, match="keeps no privacy ledger"):  # a simulated node with no file named
        admit_run(budget, "query", 1, dp, {"dataset": "crc"}, None, None, lambda: 10)
    with pytest.raises(SiteConfigError, match="node config lacks"):  # the dataset is the node's data (a failure)
        admit_run(budget, "query", 1, dp, {"privacy-ledger": str(path), "data-path": "/x"}, None, None, lambda: 10)

    features = tmp_path / "site" / "features"
    features.mkdir(parents=True)
    (tmp_path / "site" / "labels.csv").write_text("slide_id,label\n")
    node.update({"data-path": str(features / ".." / "features"), "labels": str(tmp_path / "site" / "labels.csv")})
    admit_run(budget, "query", 11, dp, node, None, None, lambda: 10)
    assert PrivacyLedger(path).charges() == []  # the query is checked, not charged
    admit_run(budget, "train.default", 11, dp, node, None, None, lambda: 10)
    [entry] = PrivacyLedger(path).charges()
    assert entry["dataset"] == str(features.resolve()) == node_dataset(node, None)
    assert (entry["epsilon"], entry["rounds"], entry["train-bags"], entry["site"]) == (3.0, 2, 10, "site_a")
    with pytest.raises(PolicyViolation, match=r"plans epsilon 3, which would exceed lifetime-epsilon 4"):
        admit_run(budget, "query", 12, dp, node, None, None, lambda: 10)
    # A named dataset is its own account: the same slides under another directory share it by that name.
    admit_run(budget, "train", 12, dp, {**node, "dataset": "crc-2024"}, None, None, lambda: 10)

    # With a fixed noise multiplier the charge is the ε of all the run's planned steps for this site's bags.
    fixed = FedConfig(dp="slide-dpsgd", dp_noise_multiplier=1.5, num_server_rounds=3, dp_batch_size=4)
    admit_run(SitePolicy(), "train", 13, fixed.to_run_config(), {**node, "dataset": "fixed"}, None, None, lambda: 20)
    plan = dpsgd.plan_for(20, fixed)
    assert PrivacyLedger(path).account("fixed").epsilon == pytest.approx(plan.epsilon(plan.total_steps))


def test_the_ledger_lives_beside_the_audit_log_unless_named(tmp_path):
    assert node_ledger({}, tmp_path / "audit" / "a.jsonl").path == tmp_path / "audit" / LEDGER_FILE
    assert node_ledger({"privacy-ledger": "/var/lib/x.jsonl"}, tmp_path / "a.jsonl").path == Path("/var/lib/x.jsonl")
    assert node_ledger({}, None) is None


def test_lifetime_epsilon_in_the_policy_file(tmp_path):
    path = tmp_path / "policy.toml"
    path.write_text("lifetime-epsilon = 8\n")
    policy = load_policy(path)
    assert policy.lifetime_epsilon == 8.0 and "lifetime-epsilon = 8.0" in policy.describe()
    assert "lifetime-epsilon = 0 (no limit)" in SitePolicy().describe()
    for bad in ("-1", "nan", "inf"):
        path.write_text(f"lifetime-epsilon = {bad}\n")
        with pytest.raises(PolicyError, match="lifetime-epsilon must be a finite number >= 0"):
            load_policy(path)


# -- through the real ClientApp ----------------------------------------------------------------------------------

def test_a_federation_is_refused_at_its_first_message_once_the_budget_is_spent(cohort, tmp_path):
    """Two runs of the real server and ClientApp: the first is admitted and charged at every site, the second
    (after the sites "restart": a new app, the same ledger file) is refused at its query, before any training."""
    policy, ledger = tmp_path / "policy.toml", tmp_path / "ledger.jsonl"
    policy.write_text("min-train-bags = 1\nallow-site-metrics = true\nlifetime-epsilon = 5\n")
    nodes = [{"partition-id": i, "policy": str(policy), "privacy-ledger": str(ledger)} for i in range(3)]
    cfg = FedConfig(hidden_dim=16, attn_dim=8, test_frac=0.3, val_frac=0.2, min_available_nodes=3,
                    num_server_rounds=2, dp="slide-dpsgd", dp_batch_size=2, dp_epsilon=3.0, round_timeout=5)

    first = InlineGrid(make_client_app(cohort), nodes)
    rows = history(run_server(first, FedConfig(**{**cfg.__dict__, "out_dir": str(tmp_path / "run1")})).out_dir)
    assert [r["aggregated"] for r in rows] == [3, 3]
    charges = lines(ledger)
    assert len(charges) == 3 and {c["run-id"] for c in charges} == {1} and {c["epsilon"] for c in charges} == {3.0}
    assert len({c["dataset"] for c in charges}) == 3  # one account per site's data

    second = InlineGrid(make_client_app(cohort), nodes)
    TaskIdentity.run_id = 2  # another run of the federation
    with pytest.raises(FederationError, match="only 0 of 3 sites described their data"):
        run_server(second, FedConfig(**{**cfg.__dict__, "out_dir": str(tmp_path / "run2")}))
    assert [m.metadata.message_type for m in second.sent] == [MessageType.QUERY] * 3  # nothing trained
    for reply in second.sent:
        assert reply.has_error() and reply.error.reason == (
            "PolicyViolation: site policy: this run plans epsilon 3, which would exceed lifetime-epsilon 5 for this "
            "dataset (spent 3 in 1 earlier run; 2 left)")
    assert lines(ledger) == charges  # the refused run is not charged
