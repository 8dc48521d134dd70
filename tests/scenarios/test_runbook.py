"""docs/hospital-runbook.md: its commands are the ones these tests run, and its error messages the tools' own.

The runbook tags what is tested:

* ``<!-- runbook-test: NAME -->`` on the line before a fenced block: :func:`run_block` runs that ``bash`` block
  exactly as written, with ``bash -euo pipefail`` in the project root, this environment's ``bin`` first on
  ``PATH`` and the runbook's variables (``$SLIDES``, ``$OUT``, ``$CERTS``, ...) pointed at test paths;
  :func:`doc_block` reads a tagged file (the example site policy);
* ``<!-- runbook-message: NAME -->`` before a ``text`` block: a test makes the tool print that error for real
  (the shared broken slides, a missing MPP, a wrong certificate, a site policy refusing, ...) and
  :func:`quoted` checks that every line of the block occurs in what the tool printed or wrote.

:func:`test_every_tagged_block_is_tested_and_every_tested_block_tagged` ties the two sides together: a tag
no test names, or a name no tag carries, fails, so the runbook and its tests cannot drift apart. Container
commands (``podman run ...``) are run by ``tests/scenarios/test_container.py``, with the images it builds.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from bagsites import _attrs, make_cohort, make_site
from flwr.app import Message, MessageType, RecordDict

from models import create_model
from preprocessing.h5format import FeatureWriter, check_feature_file
from wsi_fl.cli import main
from wsi_fl.engines.inline import InlineGrid
from wsi_fl.engines.simulation import OFFLINE_ENV
from wsi_fl.federation import arrays as fedarrays
from wsi_fl.federation.config import FedConfig
from wsi_fl.mil.data import read_labels
from wsi_fl.mil.fit import fit
from wsi_fl.mil.training import TrainConfig
from wsi_fl.server.loop import client_config
from wsi_fl.site.app import make_client_app

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "hospital-runbook.md"
BIN = Path(sys.executable).parent  # this environment's wsi-fl, python, flwr, flower-supernode
MARK = re.compile(r"^<!-- runbook-(test|message): ([a-z0-9-]+) -->$", re.M)
FENCE = re.compile(r"```(\w+)\n(.*?)\n```$", re.S | re.M)
ANSI = re.compile(r"\x1b\[[0-9;]*m")
IN_CI = os.environ.get("CI", "").lower() == "true"


# -- reading the runbook -----------------------------------------------------------------------------------------

def _tagged() -> dict[str, dict[str, tuple[str, str]]]:
    """``{"test": {name: (language, body)}, "message": {...}}``; AssertionError for a tag not before a fence."""
    text = DOC.read_text(encoding="utf-8")
    found: dict[str, dict[str, tuple[str, str]]] = {"test": {}, "message": {}}
    problems = [line for line in text.splitlines() if "runbook-" in line and line.startswith("<!--")
                and not MARK.fullmatch(line)]
    for mark in MARK.finditer(text):
        kind, name = mark.groups()
        fence = FENCE.match(text, mark.end() + 1)
        if fence is None:
            problems.append(f"{mark.group(0)} is not followed by a fenced block")
        elif name in found[kind]:
            problems.append(f"{mark.group(0)} appears twice")
        else:
            found[kind][name] = (fence.group(1), fence.group(2))
    assert not problems, problems
    return found


#: The test modules that run runbook blocks: this one, and the container tests (the ``podman`` blocks).
RUNNERS = (Path(__file__), Path(__file__).with_name("test_container.py"))


def _names_used_here() -> dict[str, set[str]]:
    """The block and message names the tests use (read from their sources, so nothing is listed twice)."""
    source = "".join(path.read_text(encoding="utf-8") for path in RUNNERS)
    return {"test": set(re.findall(r"(?:run_block|doc_block|start_block)\(\s*\"([a-z0-9-]+)\"", source)),
            "message": set(re.findall(r"quoted\(\s*\"([a-z0-9-]+)\"", source))}


def doc_block(name: str, language: str) -> str:
    lang, body = _tagged()["test"][name]
    assert lang == language, f"runbook block {name} is {lang}, expected {language}"
    return body


def _env(variables: dict[str, object], path_first: Path | None = None) -> dict[str, str]:
    env = {**os.environ, **OFFLINE_ENV, **{k: str(v) for k, v in variables.items()}}
    env["PATH"] = os.pathsep.join([*([str(path_first)] if path_first else []), str(BIN), os.environ["PATH"]])
    env.setdefault("FLWR_HOME", str(Path(str(variables.get("TMP", "/tmp"))) / "flwr-home"))
    return env


def run_block(name: str, timeout: float = 600, path_first: Path | None = None, **variables: object) -> SimpleNamespace:
    """Run the runbook's bash block ``name`` as written; ``.code``, ``.out`` (stdout and stderr, no colours).

    The block's own exit ends the wait: a helper it leaves behind (Flower's ``flower-superexec`` can outlive a
    SuperNode that gave up) is stopped with the block's session, and does not hold its output open.
    """
    script = doc_block(name, "bash")
    with tempfile.TemporaryFile("w+", encoding="utf-8", errors="replace") as out:
        proc = subprocess.Popen(["bash", "-euo", "pipefail", "-c", script], cwd=ROOT, stdout=out,
                                stderr=subprocess.STDOUT, env=_env(variables, path_first), start_new_session=True)
        try:
            proc.wait(timeout=timeout)
            timed_out = False
        except subprocess.TimeoutExpired:
            timed_out = True
        stop(proc)
        out.seek(0)
        text = out.read() + (f"\n[runbook block {name} timed out after {timeout:.0f} s]" if timed_out else "")
    return SimpleNamespace(code=proc.returncode, out=ANSI.sub("", text))


def start_block(name: str, log: Path, path_first: Path | None = None, **variables: object) -> subprocess.Popen:
    """Start a long-running bash block (a SuperNode) in its own session; stop it with :func:`stop`."""
    script = doc_block(name, "bash")
    with log.open("w") as out:
        return subprocess.Popen(["bash", "-euo", "pipefail", "-c", script], cwd=ROOT, stdout=out,
                                stderr=subprocess.STDOUT, env=_env(variables, path_first), start_new_session=True)


def stop(proc: subprocess.Popen) -> None:
    """Stop a process started here in its own session, then whatever it left in its process group."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    for sig in (signal.SIGTERM, signal.SIGKILL):  # helpers that outlived it (same group, started by it)
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        time.sleep(1.0)


def quoted(name: str, *outputs: str) -> None:
    """Every line of the runbook's quoted message ``name`` occurs in what the tool printed or wrote."""
    lang, body = _tagged()["message"][name]
    assert lang == "text", f"runbook message {name} is {lang}, expected text"
    seen = ANSI.sub("", "\n".join(outputs))
    missing = [line for line in body.splitlines() if line.strip() and line not in seen]
    assert not missing, f"runbook message {name}: {missing} not in the tool's output:\n{seen[-4000:]}"


def manifest(out: Path, name: str = "manifest.csv") -> dict[str, dict[str, str]]:
    with (out / name).open(newline="", encoding="utf-8") as f:
        return {r["slide_id"]: r for r in csv.DictReader(f)}


def link_slides(directory: Path, slide_file, names: list[str]) -> Path:
    """Links (not copies) to shared slides; ``sub/name`` puts a link in a subdirectory (a DICOM series)."""
    for name in names:
        target = directory / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(slide_file(Path(name).name))
    return directory


def require_tool(name: str) -> None:
    if shutil.which(name) is None:
        if IN_CI:
            pytest.fail(f"{name} not installed")
        pytest.skip(f"{name} not installed")


def test_every_tagged_block_is_tested_and_every_tested_block_tagged():
    tagged, used = _tagged(), _names_used_here()
    for kind in ("test", "message"):
        assert set(tagged[kind]) - used[kind] == set(), f"runbook-{kind} tags no test uses"
        assert used[kind] - set(tagged[kind]) == set(), f"runbook-{kind} names the tests use but the runbook lacks"
    bash = {name for name, (lang, _) in tagged["test"].items() if lang == "bash"}
    in_containers = set(re.findall(r"(?:run_block|start_block)\(\s*\"([a-z0-9-]+)\"",
                                   RUNNERS[1].read_text(encoding="utf-8")))
    podman = {n for n in bash if "podman" in tagged["test"][n][1]}
    assert podman and podman <= in_containers  # the container blocks run where the images are: test_container.py


# -- preprocessing -----------------------------------------------------------------------------------------------

SHARED = ["cmu-1-small-region.svs", "tcga-cr-7395-01a-01-ts1.svs", "kidney-48-5.tif", "small.svs", "boxes.tiff",
          "dicom/boxes_0.dcm", "dicom/boxes_1.dcm", "unopenable.tiff", "unreadable.svs", "broken.svs"]


@pytest.fixture(scope="module")
def tried(tmp_path_factory, slide_file) -> SimpleNamespace:
    """The runbook's "try it first" run over every kind of shared slide, good and broken."""
    tmp = tmp_path_factory.mktemp("try")
    slides = link_slides(tmp / "slides", slide_file, SHARED)
    run = run_block("try", TRY_SLIDES=slides, TRY=tmp / "try", TMP=tmp)
    return SimpleNamespace(run=run, out=tmp / "try")


def test_try_run_goes_through_every_slide(tried):
    assert tried.run.code == 1, tried.run.out  # some slides failed, the others were done
    rows = manifest(tried.out)
    status = {sid: (r["status"], int(r["n_tiles"]) > 0) for sid, r in rows.items()}
    assert status == {  # the DICOM slide (dicom/boxes_0.dcm, dicom/boxes_1.dcm) is named after its folder
        "cmu-1-small-region": ("ok", True), "small": ("empty", False), "dicom": ("empty", False),
        "tcga-cr-7395-01a-01-ts1": ("failed", False), "kidney-48-5": ("failed", False), "boxes": ("failed", False),
        "unopenable": ("failed", False), "unreadable": ("failed", False), "broken": ("failed", False)}, status
    info = check_feature_file(tried.out / "features" / "cmu-1-small-region.h5")
    assert info.attrs["weights"] == "random-init" and info.attrs["encoder"] == "resnet18_trunc"
    assert (tried.out / "qc" / "cmu-1-small-region.png").stat().st_size > 0
    assert not (tried.out / "features" / "unreadable.h5").exists()  # nothing half-written


def test_manifest_block_lists_every_slide_that_needs_attention(tried):
    run = run_block("manifest", OUT=tried.out)
    assert run.code == 0, run.out
    assert "9 slides, 8 need attention" in run.out, run.out
    listed = {line.split(":", 1)[0] for line in run.out.splitlines()[1:]}
    assert listed == set(manifest(tried.out)) - {"cmu-1-small-region"}, run.out


def test_quoted_preprocessing_errors_are_what_the_tool_prints(tried):
    written = (tried.out / "manifest.csv").read_text(encoding="utf-8")
    quoted("no-mpp", tried.run.out)
    quoted("implausible-mpp", tried.run.out)
    quoted("unsupported", tried.run.out)
    quoted("not-a-slide", tried.run.out)
    quoted("unreadable", tried.run.out)
    quoted("too-small", written)


@pytest.fixture(scope="module")
def production(tmp_path_factory, slide_file) -> SimpleNamespace:
    """The runbook's real run (encoder and weights file as variables: here a small encoder and a weights file
    written for the test), then the same command again with an MPP CSV for the slides that lacked one."""
    import torch

    from preprocessing.tv import import_torchvision

    tmp = tmp_path_factory.mktemp("production")
    weights = tmp / "resnet18-test.pth"
    torch.manual_seed(0)
    torch.save(import_torchvision().models.resnet18().state_dict(), weights)
    slides = link_slides(tmp / "slides", slide_file,
                         ["cmu-1-small-region.svs", "tcga-cr-7395-01a-01-ts1.svs", "kidney-48-5.tif"])
    variables = dict(SLIDES=slides, OUT=tmp / "site", ENCODER="resnet18_trunc", WEIGHTS=weights, TMP=tmp)
    first = run_block("preprocess", **variables)
    first_rows = manifest(tmp / "site")
    mpp_csv = tmp / "mpp.csv"
    mpp_csv.write_text("slide_id,mpp\ntcga-cr-7395-01a-01-ts1,0.2527\nkidney-48-5,0.5\n")
    again = run_block("mpp-fix", MPP_CSV=mpp_csv, **variables)
    return SimpleNamespace(first=first, first_rows=first_rows, again=again, out=tmp / "site", weights=weights,
                           tmp=tmp)


def test_real_run_then_the_mpp_fix_redoes_only_the_failed_slides(production):
    first, again = production.first, production.again
    assert first.code == 1, first.out
    assert {s: r["status"] for s, r in production.first_rows.items()} == {
        "cmu-1-small-region": "ok", "tcga-cr-7395-01a-01-ts1": "failed", "kidney-48-5": "failed"}
    assert again.code == 0, again.out
    rows = manifest(production.out)
    assert rows["cmu-1-small-region"]["status"] == "skipped"
    assert rows["tcga-cr-7395-01a-01-ts1"]["status"] == "ok" and int(rows["tcga-cr-7395-01a-01-ts1"]["n_tiles"]) > 0
    assert rows["kidney-48-5"]["status"] == "empty" and rows["kidney-48-5"]["n_tiles"] == "0"
    quoted("no-tissue", (production.out / "manifest.csv").read_text(encoding="utf-8"))
    info = check_feature_file(production.out / "features" / "tcga-cr-7395-01a-01-ts1.h5")
    digest = hashlib.sha256(production.weights.read_bytes()).hexdigest()
    assert info.attrs["weights"] == f"sha256:{digest}" and info.attrs["mpp_source"] == "user-csv"


def test_usable_labels_keep_only_slides_with_features(production):
    labels = production.tmp / "clinical.csv"
    labels.write_text("\ufeffslide_id,label,patient_id,split,note\n"  # as Excel saves it, with a column we ignore
                      "cmu-1-small-region,1,P1,train,a\ntcga-cr-7395-01a-01-ts1,0,P2,test,b\n"
                      "kidney-48-5,0,P3,train,c\nnever-scanned,1,P4,test,d\n", encoding="utf-8")
    run = run_block("usable-labels", OUT=production.out, LABELS=labels)
    assert run.code == 0, run.out
    assert "2 of 4 labelled slides usable" in run.out and "kidney-48-5 never-scanned" in run.out, run.out
    table = read_labels(production.out / "labels.csv")
    assert [r.slide_id for r in table.records] == ["cmu-1-small-region", "tcga-cr-7395-01a-01-ts1"]
    assert [r.split for r in table.records] == ["train", "test"]


def test_no_weights_and_duplicate_slide_ids_stop_before_any_slide(tmp_path, slide_file, capsys, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-torch-home"))  # no cached weights to fall back on
    code = main(["preprocess", "--slides", str(slide_file("small.svs")), "--out", str(tmp_path / "a"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and not (tmp_path / "a" / "manifest.csv").exists(), err
    quoted("no-weights", err)

    slides = tmp_path / "slides"
    link_slides(slides, slide_file, ["2021/small.svs", "2022/small.svs"])
    code = main(["preprocess", "--slides", str(slides), "--out", str(tmp_path / "b"), "--encoder", "resnet18_trunc",
                 "--random-init", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2, err
    quoted("duplicate-id", err)


# -- certificates, keys, the site policy -------------------------------------------------------------------------

def test_coordinator_certificates_and_a_site_made_key(tmp_path):
    ca = tmp_path / "ca"
    run = run_block("make-certs", CA_DIR=ca, SUPERLINK_HOSTS="fl.example-consortium.org 10.0.0.5",
                    SITES="site_1 site_2", TMP=tmp_path)
    assert run.code == 0, run.out
    for name in ("ca.crt", "ca.key", "server.pem", "server.key", "supernodes/site_1", "supernodes/site_2.pub"):
        assert (ca / name).stat().st_size > 0, name
    for private in ("ca.key", "server.key", "supernodes/site_1"):
        assert stat.S_IMODE((ca / private).stat().st_mode) == 0o600, private
    again = run_block("make-certs", CA_DIR=ca, SUPERLINK_HOSTS="x", SITES="site_1", TMP=tmp_path)
    assert again.code == 2 and "wsi-fl certs: error: " in again.out and "already exists" in again.out, again.out

    certs = tmp_path / "certs"  # a site's own key pair: no CA, no ssh-keygen
    run = run_block("site-key", CERTS=certs, SITE="site_1")
    assert run.code == 0, run.out
    assert stat.S_IMODE((certs / "site_1").stat().st_mode) == 0o600 and stat.S_IMODE(certs.stat().st_mode) == 0o700
    assert (certs / "site_1.pub").read_text().startswith("ecdsa-sha2-nistp384 ")  # what Flower registers
    assert not (certs / "ca.key").exists() and sorted(p.name for p in certs.iterdir()) == ["site_1", "site_1.pub"]
    # read as Flower reads them: flwr supernode register (the public key), flower-supernode (the private key)
    from flwr.cli.supernode.register import try_load_public_key
    from flwr.supernode.cli.flower_supernode import _try_setup_client_authentication

    assert try_load_public_key(certs / "site_1.pub")
    private, public = _try_setup_client_authentication(SimpleNamespace(
        auth_supernode_private_key=str(certs / "site_1"), auth_supernode_public_key=None))
    assert public.public_numbers() == private.public_key().public_numbers()
    registered = (certs / "site_1.pub").read_text()
    again = run_block("site-key", CERTS=certs, SITE="site_1")  # a registered key is never replaced silently
    assert again.code == 2 and "already exist" in again.out and (certs / "site_1.pub").read_text() == registered


def test_example_policy_is_valid_and_the_check_names_a_wrong_key(tmp_path):
    policy = tmp_path / "policy.toml"
    policy.write_text(doc_block("site-policy", "toml") + "\n")
    run = run_block("policy-check", POLICY=policy)
    assert run.code == 0, run.out
    assert "allow-site-metrics = true" in run.out and "superlink = [fl.example-consortium.org:8000]" in run.out
    policy.write_text("max-round = 3\n")
    run = run_block("policy-check", POLICY=policy)
    assert run.code == 1, run.out
    quoted("policy-typo", run.out)


def test_approving_a_release_adds_the_hash_flwr_run_ships(tmp_path):
    """The runbook's approval steps on a reviewed tree: the policy then lists exactly the hash of the bundle
    ``flwr run`` builds from that tree, and ``check-policy`` shows it in force."""
    from apptrees import copy_app

    from wsi_fl.site.approval import app_hash
    from wsi_fl.site.policy import load_policy

    release, policy = copy_app(tmp_path / "release"), tmp_path / "policy.toml"
    policy.write_text(doc_block("site-policy", "toml") + "\n")
    run = run_block("app-approval", RELEASE=release, POLICY=policy)
    assert run.code == 0, run.out
    expected = app_hash(release)
    assert load_policy(policy).approved_apps == (expected,)
    assert f"approving {expected}\n" in run.out and f"  approved-apps = [{expected}]\n" in run.out, run.out


# -- what a site's ClientApp says (the real ClientApp, in this process) ------------------------------------------

SMALL = {"hidden_dim": 32, "attn_dim": 16, "test_frac": 0.3, "val_frac": 0.2, "auc_bins": 20}
LINK = "fl.example-consortium.org:8000"


def _deliver(node_config: dict, kind: str) -> Message:
    """One instruction, as the server sends it, through a ClientApp with this node config; its reply."""
    grid = InlineGrid(make_client_app(), [node_config])  # sets Flower's task identity before the message is made
    cfg = FedConfig(**SMALL)
    config = client_config(cfg, None if kind == MessageType.QUERY else ["0", "1"])
    config["server-round"] = 1
    content: dict = {"config": config}
    if kind != MessageType.QUERY:
        content["arrays"] = fedarrays.to_record(create_model(cfg.mil_config(16, 2)).state_dict())
    message = Message(content=RecordDict(content), message_type=kind, dst_node_id=1)
    return next(iter(grid.send_and_receive([message])))


def test_quoted_site_refusals_and_site_errors_are_what_the_clientapp_says(tmp_path, caplog):
    site = make_site(tmp_path, "site_a", 14, 0)  # 14 slides: fewer than 10 in the training split
    policy = tmp_path / "policy.toml"
    policy.write_text(doc_block("site-policy", "toml") + "\n")

    def node(**extra: str) -> dict[str, str]:
        return {"data-path": str(site.features_dir), "labels": str(site.labels), "site-name": "site_a",
                "audit-log": str(tmp_path / "audit.jsonl"), **extra}

    def reason(reply: Message) -> str:
        assert reply.has_error()
        return reply.error.reason

    ok = _deliver(node(policy=str(policy), superlink=LINK), MessageType.QUERY)
    assert not ok.has_error(), ok.error.reason  # the example policy serves its own SuperLink
    quoted("refused-superlink", reason(_deliver(node(policy=str(policy), superlink="10.0.0.5:8000"),
                                                MessageType.QUERY)))
    quoted("refused-no-superlink", reason(_deliver(node(policy=str(policy)), MessageType.QUERY)))
    with caplog.at_level(logging.WARNING, logger="wsi_fl.site"):
        refused = reason(_deliver(node(policy=str(policy), superlink=LINK), MessageType.TRAIN))
    quoted("refused-train-bags", refused, caplog.text)
    quoted("refused-metrics", reason(_deliver(node(), MessageType.EVALUATE)))  # no policy file: the default

    broken = tmp_path / "broken.toml"
    broken.write_text("max-round = 3\n")
    quoted("policy-broken-at-site", reason(_deliver(node(policy=str(broken)), MessageType.QUERY)))

    # a labelled slide whose preprocessing found no tissue (a zero-tile feature file): left out, with a message
    with FeatureWriter(site.features_dir / "blank.h5", 16, _attrs("blank")) as writer:
        writer.commit()
    labels = tmp_path / "labels-with-blank.csv"
    labels.write_text(site.labels.read_text() + "blank,0,p99\n")
    with caplog.at_level(logging.WARNING, logger="wsi_fl.mil"):
        assert not _deliver({**node(), "labels": str(labels)}, MessageType.QUERY).has_error()
    assert "slide blank left out: its feature file has no tiles" in caplog.text
    # a labelled slide without a feature file (failed, or never preprocessed)
    labels = tmp_path / "labels-with-ghost.csv"  # another file: loaded sites are cached by their paths
    labels.write_text(site.labels.read_text() + "ghost,0,p99\n")
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="wsi_fl.site"):
        failed = reason(_deliver({**node(), "labels": str(labels)}, MessageType.QUERY))
    quoted("site-data-error", failed, caplog.text)
    assert "ghost" not in failed and str(tmp_path) not in failed  # details stay at the site

    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="wsi_fl.site"):
        failed = reason(_deliver({**node(), "data-path": str(tmp_path / "features-typo")}, MessageType.QUERY))
    quoted("site-config-error", failed, caplog.text)

    (tmp_path / "not-a-directory").write_text("")
    quoted("audit-unwritable", reason(_deliver({**node(), "audit-log": str(tmp_path / "not-a-directory" / "a.jsonl")},
                                               MessageType.QUERY)))


# -- evaluating the coordinator's model --------------------------------------------------------------------------

def test_evaluate_scores_the_held_out_split_of_the_shared_model(tmp_path, capsys):
    """The coordinator's model (pooled here: the same split record as a federation's); our site evaluates it with
    the labels it trained with and gets exactly its held-out test slides."""
    ours = make_site(tmp_path / "consortium", "site", 24, seed=2)  # OUT: features/ and labels.csv
    other = make_site(tmp_path / "consortium", "other", 16, seed=1)
    fit([ours, other], tmp_path / "run", train=TrainConfig(epochs=2, lr=1e-3, seed=0), progress=False)
    model = tmp_path / "best.pt"
    shutil.copy(tmp_path / "run" / "model.pt", model)  # what the coordinator shares
    with (tmp_path / "run" / "splits.csv").open() as f:
        held_out = {r["slide_id"] for r in csv.DictReader(f) if r["site"] == "site" and r["split"] == "test"}
    (tmp_path / "slides").mkdir()
    report = tmp_path / "report"
    run = run_block("evaluate", MODEL=model, OUT=ours.labels.parent, REPORT=report, SLIDES=tmp_path / "slides")
    assert run.code == 0, run.out
    assert f"scored the test split: {len(held_out)} of 24 slides ({24 - len(held_out)} left out" in run.out
    metrics = json.loads((report / "metrics.json").read_text())
    assert metrics["n"] == len(held_out) and len(metrics["auc_ci95"]) == 2 and "confusion_matrix" in metrics
    assert metrics["evaluated"]["split"] == "test" and metrics["evaluated"]["held_out"] is True
    assert {r["slide_id"] for r in csv.DictReader((report / "predictions.csv").open())} == held_out
    for plot in ("roc.png", "calibration.png"):
        assert (report / plot).stat().st_size > 0
    assert len(list((report / "heatmaps").glob("*.geojson"))) == min(5, len(held_out))

    # a model from before split records: refused unless --split all (or labels with a split column)
    import torch

    payload = torch.load(model, weights_only=True)
    del payload["meta"]["splits"]
    torch.save(payload, tmp_path / "old.pt")
    code = main(["evaluate", "--model", str(tmp_path / "old.pt"), "--features", str(ours.features_dir),
                 "--labels", str(ours.labels), "--out", str(tmp_path / "old-report")])
    err = capsys.readouterr().err
    assert code == 2 and not (tmp_path / "old-report" / "metrics.json").exists(), err
    quoted("no-split-record", err)

    foreign = make_site(tmp_path / "foreign", "site", 4, seed=3, encoder="enc-b", tile_size=256)
    code = main(["evaluate", "--model", str(model), "--features", str(foreign.features_dir), "--labels",
                 str(foreign.labels), "--out", str(tmp_path / "refused")])
    err = capsys.readouterr().err
    assert code == 2 and not (tmp_path / "refused" / "metrics.json").exists(), err
    quoted("feature-space", err)


# -- a SuperNode against a SuperLink with TLS and SuperNode authentication ---------------------------------------

def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.3)


@contextmanager
def tls_superlink(ca: Path, home: Path, log: Path) -> Iterator[int]:
    """A SuperLink as the runbook's coordinator starts it (TLS from ``ca``, SuperNode authentication) on a free
    loopback port, and the coordinator's ``flwr`` connection ``consortium`` to it in ``home``; yields the port."""
    port = _free_port()
    with log.open("w") as out:
        link = subprocess.Popen([str(BIN / "flower-superlink"), "--ssl-ca-certfile", str(ca / "ca.crt"),
                                 "--ssl-certfile", str(ca / "server.pem"), "--ssl-keyfile", str(ca / "server.key"),
                                 "--enable-supernode-auth", "--host", "127.0.0.1", "--port", str(port),
                                 "--disable-runtime-dependency-installation"],
                                stdout=out, stderr=subprocess.STDOUT, env=_env({"FLWR_HOME": home}),
                                start_new_session=True)
    try:
        def listening() -> bool:
            assert link.poll() is None, log.read_text()
            with socket.socket() as sock:
                return sock.connect_ex(("127.0.0.1", port)) == 0
        _wait_for(listening, 120, "the SuperLink")
        home.mkdir(exist_ok=True)
        (home / "config.toml").write_text(  # the coordinator's connection, as in the runbook
            f'[superlink]\ndefault = "consortium"\n\n[superlink.consortium]\naddress = "127.0.0.1:{port}"\n'
            f'root-certificates = "{ca / "ca.crt"}"\n')
        yield port
    finally:
        stop(link)


@pytest.mark.slow
def test_supernode_connects_and_each_connection_error_is_the_quoted_one(tmp_path):
    """The runbook's key, registration and SuperNode commands against a real SuperLink; then each way to get the
    connection wrong. A shim puts ``--port`` last on ``flower-supernode`` so that its local ClientApp API does
    not take 9094 on a shared test machine (the runbook's own advice for a busy host)."""
    ca, certs, home = tmp_path / "ca", tmp_path / "certs", tmp_path / "flwr-home"
    assert run_block("make-certs", CA_DIR=ca, SUPERLINK_HOSTS="127.0.0.1", SITES="site_2", TMP=tmp_path).code == 0
    assert run_block("site-key", CERTS=certs, SITE="site_1").code == 0
    shutil.copy(ca / "ca.crt", certs / "ca.crt")  # what the coordinator sends every site

    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "flower-supernode").write_text(
        f'#!/bin/sh\nexec "{BIN / "flower-supernode"}" "$@" --port "$SUPERNODE_TEST_PORT"\n')
    (shim / "flower-supernode").chmod(0o755)
    (shim / "wsi-fl").write_text(  # the site's runner follows its SuperNode to the same port
        f'#!/bin/sh\nexec "{BIN / "wsi-fl"}" "$@" --runtime-api "127.0.0.1:$SUPERNODE_TEST_PORT"\n')
    (shim / "wsi-fl").chmod(0o755)
    node = runner = None
    with tls_superlink(ca, home, tmp_path / "superlink.log") as port:
        site = dict(CERTS=certs, SITE="site_1", SUPERLINK=f"127.0.0.1:{port}", FLWR_HOME=home, OUT=tmp_path / "site",
                    POLICY=tmp_path / "policy.toml", AUDIT_LOG=tmp_path / "audit.jsonl")
        try:
            run = run_block("register", PUBKEY=certs / "site_1.pub", SITE="site_1", FLWR_HOME=home)
            assert run.code == 0, run.out

            log, runner_log, api = tmp_path / "supernode.log", tmp_path / "runner.log", _free_port()
            node = start_block("supernode", log, path_first=shim, SUPERNODE_TEST_PORT=api, **site)

            def connected() -> bool:
                text = log.read_text(errors="replace")
                assert node.poll() is None, text
                return "SuperNode ID:" in text
            _wait_for(connected, 120, "the SuperNode to connect")
            # The site's task runner polls that SuperNode's Runtime API (no task comes: none is run here), and
            # stopping it, as a service manager does, is a normal end: exit 0, no "interrupted".
            runner = start_block("site-runner", runner_log, path_first=shim, SUPERNODE_TEST_PORT=api)
            _wait_for(lambda: "polling 127.0.0.1:" in runner_log.read_text(), 60, "the site runner to start")
            time.sleep(3.0)
            assert runner.poll() is None and "Connection attempt failed" not in runner_log.read_text()
            stop(runner)
            assert runner.returncode == 0 and "interrupted" not in runner_log.read_text(), runner_log.read_text()
            stop(node)

            def check(**changes: object) -> str:
                run = run_block("connection-check", timeout=90, path_first=shim, SUPERNODE_TEST_PORT=_free_port(),
                                **{**site, **changes})
                assert run.code == 1, run.out  # it stops by itself and says why
                return run.out

            quoted("tls-name", check(SUPERLINK=f"localhost:{port}"))  # the certificate names 127.0.0.1 only
            unregistered = tmp_path / "unregistered"
            unregistered.mkdir()
            shutil.copy(certs / "ca.crt", unregistered / "ca.crt")
            shutil.copy(ca / "supernodes" / "site_2", unregistered / "site_2")  # a key nobody registered
            quoted("unregistered", check(CERTS=unregistered, SITE="site_2"))
            other = tmp_path / "other-ca"
            assert run_block("make-certs", CA_DIR=tmp_path / "old", SUPERLINK_HOSTS="127.0.0.1", SITES="site_1",
                             TMP=tmp_path).code == 0
            other.mkdir()
            shutil.copy(tmp_path / "old" / "ca.crt", other / "ca.crt")  # an outdated CA certificate
            shutil.copy(certs / "site_1", other / "site_1")
            quoted("wrong-ca", check(CERTS=other))
            nobody = check(SUPERLINK=f"127.0.0.1:{_free_port()}")  # nothing listens there
            quoted("no-superlink", nobody)
            quoted("no-superlink-check", nobody)
        finally:
            for proc in (runner, node):
                if proc is not None:
                    stop(proc)


# -- the rehearsal on one machine --------------------------------------------------------------------------------

@pytest.mark.slow
def test_rehearsal_on_one_machine(tmp_path):
    make_cohort(tmp_path / "cohort")
    run = run_block("rehearsal", timeout=1200, COHORT=tmp_path / "cohort", REHEARSAL=tmp_path / "rehearsal")
    assert run.code == 0, run.out[-6000:]
    assert "OK: status finished:completed, rounds 2/2" in run.out, run.out[-6000:]
    for name in ("best.pt", "last.pt", "metrics.jsonl"):
        assert (tmp_path / "rehearsal" / name).stat().st_size > 0, name
    rows = [json.loads(line) for line in (tmp_path / "rehearsal" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2] and np.isfinite(rows[-1]["train-loss"]), rows[-1]
