"""What leaves a site, and the site's own record of it.

One short federation on the real ClientApp and server loop (in-process grid):
two sites that answer everything, one whose policy refuses evaluation and one
whose data path is wrong (and which, without a policy file, has the default
one, which refuses evaluation before the missing data is noticed). Every reply any ClientApp sent (``InlineGrid.sent``,
copied before the server touches it) must hold only the model's arrays and the
known aggregate keys, with scalar or integer-count values, and nothing that
names a slide, patient, file or site; each site's audit log must have one line
per instruction and one per reply, and no data.
"""

from __future__ import annotations

import csv
import json
import logging
import threading
from pathlib import Path

import pytest
from bagsites import DIM, make_site
from flwr.app import Message, MessageType, RecordDict

from models import create_model
from models.checkpoint import PROVENANCE_KEYS
from wsi_fl.engines.inline import InlineGrid
from wsi_fl.federation.config import FedConfig
from wsi_fl.server.loop import client_config, run_server
from wsi_fl.site import audit
from wsi_fl.site.app import make_client_app

SITES = ("hospital_alpha", "hospital_beta", "hospital_gamma")
BINS = 20
ROUNDS = 2
CFG = {"hidden_dim": 32, "attn_dim": 16, "lr": 2e-3, "test_frac": 0.3, "val_frac": 0.2, "auc_bins": BINS,
       "num_server_rounds": ROUNDS, "min_available_nodes": 3, "min_train_nodes": 2, "min_evaluate_nodes": 2}
QUERY_KEYS = {"feature-dim", "classes", "provenance", "n-train"}
TRAIN_KEYS = {"num-examples", "train-loss"}
EVAL_KEYS = {f"{s}-{k}" for s in ("val", "test") for k in ("n", "loss-sum", "hist", "confusion")} | {"num-examples"}


class Federation:
    def __init__(self, root: Path) -> None:
        self.root, self.cohort = root, root / "cohort"
        self.slide_ids: list[str] = []
        self.patient_ids: list[str] = []
        for k, name in enumerate(SITES):
            site = make_site(self.cohort, name, 10 + 2 * k, 101 * k)
            rows = list(csv.reader(site.labels.open()))
            for row in rows[1:]:  # patient ids no test string could match by chance
                row[2] = f"PID-{name[9:]}-{row[2]}"
                self.slide_ids.append(row[0])
                self.patient_ids.append(row[2])
            with site.labels.open("w", newline="") as f:
                csv.writer(f).writerows(rows)
        (root / "policy.toml").write_text("allow-site-metrics = false\nmin-train-bags = 1\n")
        self.missing = root / "vanished_mount" / "features"
        self.audit = {n: root / "audit" / f"node{n}.jsonl" for n in (1, 2, 3, 4)}
        nodes = [{"partition-id": 0, "audit-log": str(self.audit[1])},
                 {"partition-id": 1, "audit-log": str(self.audit[2])},
                 {"partition-id": 2, "audit-log": str(self.audit[3]), "policy": str(root / "policy.toml")},
                 {"data-path": str(self.missing), "labels": str(root / "vanished_mount" / "labels.csv"),
                  "audit-log": str(self.audit[4])}]
        self.grid = InlineGrid(make_client_app(self.cohort), nodes)
        self.cfg = FedConfig(**{**CFG, "out_dir": str(root / "run")})
        self.result = run_server(self.grid, self.cfg)
        self.state_dict = create_model(self.cfg.mil_config(DIM, 2)).state_dict()

    def forbidden(self) -> list[str]:
        """Strings that name a slide, a patient, a file or a site."""
        return [*self.slide_ids, *self.patient_ids, *SITES, "hospital", ".h5", ".csv", "labels", "features",
                "vanished_mount", str(self.root), "/tmp", ".tiff"]


@pytest.fixture(scope="module")
def fed(tmp_path_factory) -> Federation:
    return Federation(tmp_path_factory.mktemp("audit"))


def strings(value) -> list[str]:
    """Every key and string value inside ``value`` (nested lists and dicts)."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for k, v in value.items() for s in (str(k), *strings(v))]
    if isinstance(value, list | tuple):
        return [s for v in value for s in strings(v)]
    return []


def test_the_run_went_on_without_the_refusing_and_the_broken_site(fed):
    assert fed.result.rounds_completed == ROUNDS
    assert all(r["aggregated"] == 3 and r["failed"] == 1 and r["eval-replies"] == 2 for r in fed.result.history)


def test_every_reply_holds_only_model_arrays_and_aggregates(fed):
    replies = fed.grid.sent
    kinds = [r.metadata.message_type for r in replies if not r.has_error()]
    assert kinds.count(MessageType.QUERY) == 3 and kinds.count(MessageType.TRAIN) == 3 * ROUNDS
    assert kinds.count(MessageType.EVALUATE) == 2 * ROUNDS
    for reply in replies:
        if reply.has_error():
            continue
        content, kind = reply.content, reply.metadata.message_type
        if kind == MessageType.QUERY:
            assert set(content.keys()) == {"info"} and set(content["info"].keys()) == QUERY_KEYS
            assert isinstance(content["info"]["n-train"], int) and content["info"]["classes"] == ["0", "1"]
            assert set(json.loads(content["info"]["provenance"])) <= set(PROVENANCE_KEYS)  # the feature space only
            continue
        if kind == MessageType.TRAIN:
            assert set(content.keys()) == {"arrays", "metrics"}
            arrays = content["arrays"]
            assert list(arrays.keys()) == list(fed.state_dict.keys())  # exactly the model's state-dict keys
            assert all(tuple(arrays[k].shape) == tuple(v.shape) for k, v in fed.state_dict.items())
            assert set(content["metrics"].keys()) == TRAIN_KEYS
        else:
            assert set(content.keys()) == {"metrics"} and set(content["metrics"].keys()) == EVAL_KEYS
        for key, value in content["metrics"].items():
            if isinstance(value, list):  # counts only, of a size fixed by the settings, never one per slide
                assert all(isinstance(v, int) for v in value), key
                assert len(value) == (2 * BINS if key.endswith("-hist") else 4), key
            else:
                assert isinstance(value, int | float), key


def test_nothing_sent_names_a_slide_patient_file_or_site(fed):
    forbidden = fed.forbidden()
    for reply in fed.grid.sent:
        if reply.has_error():
            sent = [reply.error.reason]
        else:
            sent = [s for record in reply.content.values() for s in strings(dict(record.items()))]
        leaked = [f for f in forbidden if any(f in s for s in sent)]
        assert not leaked, f"{reply.metadata.message_type} reply names {leaked}"


def test_errors_leave_the_site_without_their_details(fed):
    errors = [r.error.reason for r in fed.grid.sent if r.has_error()]
    broken = [e for e in errors if "SiteConfigError" in e]
    assert len(broken) == 1 + ROUNDS  # node 4's query and training (its default policy refuses evaluation first)
    assert set(broken) == {"SiteConfigError at the site (its log has the details)"}
    assert sum("allow-site-metrics is false" in e for e in errors) == 2 * ROUNDS  # nodes 3 and 4


def audit_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_each_site_logs_every_instruction_and_reply(fed):
    expected = {1: "sent", 2: "sent", 3: "sent", 4: "failed"}
    for node, path in fed.audit.items():
        lines = audit_lines(path)
        assert len(lines) == 2 * (1 + 2 * ROUNDS), node
        for instruction, outcome in zip(lines[::2], lines[1::2], strict=True):
            assert instruction["event"] == "received"
            assert outcome["reply-to"] == instruction["message-id"]
            assert outcome["message-type"] == instruction["message-type"]
            assert instruction["run-id"] == outcome["run-id"] == 1 and instruction["node-id"] == node
            evaluate = instruction["message-type"] == MessageType.EVALUATE
            want = "refused" if node in (3, 4) and evaluate else expected[node]
            assert outcome["event"] == want, (node, outcome)
        assert [x["message-type"] for x in lines[::2]] == ["query"] + ["train", "evaluate"] * ROUNDS
        assert [x.get("server-round") for x in lines[::2]] == [None] + [r for r in range(1, ROUNDS + 1) for _ in "te"]
    refused = [x for n in (3, 4) for x in audit_lines(fed.audit[n]) if x["event"] == "refused"]
    assert all("allow-site-metrics is false" in x["reason"] for x in refused)
    failed = [x for x in audit_lines(fed.audit[4]) if x["event"] == "failed"]
    assert {x["error"] for x in failed} == {"SiteConfigError"}


def test_audit_lines_hold_shapes_and_settings_not_data(fed):
    values = [v for r in fed.grid.sent if not r.has_error() for rec in r.content.metric_records.values()
              for v in rec.values() if isinstance(v, float) and v not in (0.0, 1.0)]
    assert values
    for path in fed.audit.values():
        text = path.read_text()
        leaked = [f for f in fed.forbidden() if f in text]
        assert not leaked, f"{path.name} names {leaked}"
        assert not [v for v in values if repr(v) in text], "a metric value is in the audit log"
        for line in audit_lines(path):
            for record in line.get("content", {}).values():
                if record["kind"] == "arrays":  # name -> shape, dtype, bytes
                    assert list(record["items"]) == list(fed.state_dict)
                    for name, desc in record["items"].items():
                        assert desc["shape"] == list(fed.state_dict[name].shape) and desc["dtype"] == "float32"
                        assert desc["bytes"] >= 4 * fed.state_dict[name].numel()
                elif record["kind"] == "metrics" or line["event"] == "sent":  # names and sizes only
                    assert all(isinstance(v, int) for v in record["items"].values()), record
        received = [x for x in audit_lines(path) if x["event"] == "received"]
        assert received[-1]["content"]["config"]["items"]["model"] == "gated_attention"  # the settings it obeyed
        assert received[-1]["content"]["config"]["items"]["auc-bins"] == BINS


def test_simulated_sites_without_an_audit_log_write_none(fed):
    assert not list(fed.cohort.rglob(audit.AUDIT_FILE))


# -- where the log is, and how it is written ---------------------------------------------------------------------

def query(cfg: FedConfig) -> Message:
    """The server's first instruction (make it after the grid: the grid sets Flower's task identity)."""
    return Message(content=RecordDict({"config": client_config(cfg, None)}), message_type=MessageType.QUERY,
                   dst_node_id=1)


def test_default_audit_log_is_next_to_the_data_and_falls_back(fed, tmp_path, caplog, monkeypatch):
    site = fed.cohort / SITES[0]
    grid = InlineGrid(make_client_app(), [{"data-path": str(site / "features"), "labels": str(site / "labels.csv"),
                                           "policy": str(fed.root / "policy.toml")}])
    assert not next(iter(grid.send_and_receive([query(fed.cfg)]))).has_error()
    written = site / audit.AUDIT_FILE
    assert [x["event"] for x in audit_lines(written)] == ["received", "sent"]
    written.unlink()
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    with caplog.at_level(logging.WARNING, logger="wsi_fl.site.audit"):
        fallback = audit.default_audit_path(None, "site_x")
    assert fallback == tmp_path / "state" / "wsi-fl" / "audit-site_x.jsonl"
    assert any("cannot be written" in r.getMessage() for r in caplog.records)


def test_an_audit_log_that_cannot_be_written_stops_the_reply(fed, tmp_path):
    grid = InlineGrid(make_client_app(fed.cohort), [{"partition-id": 0, "audit-log": str(tmp_path)}])  # a directory
    reply = next(iter(grid.send_and_receive([query(fed.cfg)])))
    assert reply.has_error() and "audit log cannot be written" in reply.error.reason
    assert str(tmp_path) not in reply.error.reason


def test_concurrent_appends_never_interleave(tmp_path):
    log = audit.AuditLog(tmp_path / "deep" / "audit.jsonl")
    entry = {"event": "sent", "content": {"arrays": {"kind": "arrays", "items": {f"w{i}": {"shape": [i]}
                                                                               for i in range(200)}}}}

    def write(k: int) -> None:
        for i in range(25):
            log.append({**entry, "writer": k, "i": i})

    threads = [threading.Thread(target=write, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    lines = audit_lines(log.path)
    assert len(lines) == 100 and {(x["writer"], x["i"]) for x in lines} == {(k, i) for k in range(4) for i in range(25)}
    assert (log.path.stat().st_mode & 0o777) == 0o600
