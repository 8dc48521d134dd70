"""Which app releases a site runs: bundle hashes (``wsi-fl app-hash``), the policy's ``approved-apps``, the
runner's refusal, ``require-secagg`` and ``wsi-fl check-policy``.

The end-to-end check, a tampered bundle refused at every site of a TLS deployment, is in
``tests/scenarios/test_deployment.py``; these are the parts, each with the real thing (Flower's own bundle
builder and ``flwr build``, real Flower messages, real files).
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from apptrees import copy_app, tamper
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from wsi_fl.cli.main import main
from wsi_fl.site.approval import AppRefused, app_hash, build_bundle, bundle_hash, check_app
from wsi_fl.site.policy import PolicyError, PolicyViolation, SiteFacts, check_instruction, load_policy
from wsi_fl.site.runner import approve

ROOT = Path(__file__).resolve().parents[2]
HASH = re.compile(r"sha256:[0-9a-f]{64}")


@pytest.fixture(scope="module")
def app_copy(tmp_path_factory) -> Path:
    return copy_app(tmp_path_factory.mktemp("app") / "wsi-fl")


def test_app_hash_is_the_hash_of_what_flwr_build_writes(app_copy, tmp_path, capsys):
    """``wsi-fl app-hash DIR`` = sha256 of the bundle Flower's own ``flwr build --app DIR`` writes (the same
    builder ``flwr run DIR`` ships to the SuperNodes); the same tree twice gives the same hash."""
    out = subprocess.run([str(Path(sys.executable).parent / "flwr"), "build", "--app", str(app_copy)], cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    [fab] = tmp_path.glob("*.fab")
    assert main(["app-hash", str(app_copy)]) == 0
    printed = capsys.readouterr().out.strip()
    assert HASH.fullmatch(printed)
    assert printed == "sha256:" + hashlib.sha256(fab.read_bytes()).hexdigest() == app_hash(app_copy)
    assert printed[7:15] in fab.name  # Flower names the file after the same hash


def test_app_hash_changes_with_one_altered_module_and_refuses_a_non_app(app_copy, tmp_path, capsys):
    genuine = app_hash(app_copy)
    altered = tamper(copy_app(tmp_path / "altered"), tmp_path / "marker")
    assert app_hash(altered) != genuine
    assert not (tmp_path / "marker").exists(), "hashing a tree never runs its code"
    assert main(["app-hash", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err == f"wsi-fl app-hash: error: {tmp_path}: no pyproject.toml, not a Flower app directory\n"


def test_check_app_hashes_the_content_and_names_the_release_in_one_line(app_copy):
    content = build_bundle(app_copy)
    app = bundle_hash(content)
    assert check_app((app,), content, "site_1") == app
    with pytest.raises(AppRefused) as refused:
        check_app((app,), content + b"\0", "site_1")  # one byte more: another release, whatever it claims to be
    other = bundle_hash(content + b"\0")
    assert refused.value.app == other
    assert str(refused.value) == (f"site site_1 refused app {other[:19]}…: not an approved release "
                                  "(policy approved-apps)")


def _message() -> Message:
    """A query as a task's runner pulls it (Flower sets the task's identity first, as ``pull_task_input`` does)."""
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 3, 7
    msg = Message(content=RecordDict({"config": ConfigRecord({"server-round": 0})}), dst_node_id=7,
                  message_type=MessageType.QUERY)
    msg.metadata.__dict__["_message_id"] = msg.object_id  # as Flower sets it on delivery
    return msg


def test_the_runner_refuses_an_unapproved_bundle_and_audits_it(app_copy, tmp_path, caplog):
    """The runner's check (site code): an unapproved bundle is refused with the one-line reason, the audit log
    (node config ``audit-log``) gets a ``refused`` line naming the full hash; an approved one passes; an
    unreadable policy refuses every bundle without naming its path to the server."""
    content = build_bundle(app_copy)
    policy, journal = tmp_path / "policy.toml", tmp_path / "audit" / "audit.jsonl"
    node_config = {"site-name": "site_1", "policy": str(policy), "audit-log": str(journal)}
    context = Context(run_id=3, node_id=7, node_config=node_config, state=RecordDict(), run_config={})
    policy.write_text(f'approved-apps = ["{bundle_hash(b"another release")}"]\n')
    with caplog.at_level("WARNING", logger="wsi_fl.site.runner"), pytest.raises(AppRefused) as refused:
        approve(_message(), context, content)
    app = bundle_hash(content)
    assert str(refused.value) == f"site site_1 refused app {app[:19]}…: not an approved release (policy approved-apps)"
    [line] = [json.loads(x) for x in journal.read_text().splitlines()]
    assert line["event"] == "refused" and line["app"] == app and line["reason"] == str(refused.value)
    assert line["message-type"] == MessageType.QUERY and line["node-id"] == 7
    assert [r.getMessage().count("\n") for r in caplog.records] == [0]
    policy.write_text(f'approved-apps = ["{bundle_hash(b"another release")}", "{app}"]\n')
    assert approve(_message(), context, content) == app
    policy.write_text("approved-apps = [\n")  # broken: fail closed
    with pytest.raises(AppRefused, match=r"its site policy cannot be read \(the site's log has the details\)$"):
        approve(_message(), context, content)
    assert str(policy) not in journal.read_text().splitlines()[-1]


def test_policy_approved_apps_and_require_secagg(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('approved-apps = ["sha256:ABC"]\n')
    with pytest.raises(PolicyError, match=r"approved-apps: 'sha256:ABC' is not sha256:<64 lower-case hex>"):
        load_policy(bad)
    good = tmp_path / "good.toml"
    good.write_text(f'require-secagg = true\napproved-apps = "{bundle_hash(b"x")}"\n')
    policy = load_policy(good)
    assert policy.approved_apps == (bundle_hash(b"x"),) and policy.require_secagg
    with pytest.raises(PolicyViolation, match="does not use SecAgg"):
        check_instruction(policy, MessageType.TRAIN, {"secagg": False}, SiteFacts())
    check_instruction(policy, MessageType.TRAIN, {"secagg": True}, SiteFacts())


def documented_policies() -> list[str]:
    """The ``toml`` blocks of docs/site-policy.md: what a hospital copies."""
    return re.findall(r"```toml\n(.*?)```", (ROOT / "docs" / "site-policy.md").read_text(), flags=re.S)


def test_check_policy_accepts_the_documented_examples_and_refuses_a_broken_file(tmp_path, capsys):
    examples = documented_policies()
    assert examples
    for k, text in enumerate(examples):
        path = tmp_path / f"example-{k}.toml"
        path.write_text(text)
        assert main(["check-policy", str(path)]) == 0, capsys.readouterr().err
        out = capsys.readouterr().out
        assert out.startswith(f"{path}: a valid site policy; it allows:\n")
        assert "\n  approved-apps = " in out and "\n  require-secagg = " in out
    broken = tmp_path / "broken.toml"
    broken.write_text('max-rounds = "many"\nallow-everything = true\n')
    assert main(["check-policy", str(broken)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("wsi-fl check-policy: error: ") and err.count("\n") == 1 and str(broken) in err, err
