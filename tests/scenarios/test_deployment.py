"""The app in Flower's deployment runtime: a SuperLink, three SuperNodes and ``flwr run``, all on loopback.

What only a deployment exercises: the FAB built from ``pyproject.toml``, the
ServerApp and ClientApps importing ``wsi_fl`` in their own subprocesses, sites
found through node config, the run config parsed from ``flwr run``, and every
process stopped afterwards (:mod:`wsi_fl.engines.deployment`, ``wsi-fl rehearse``).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from apptrees import copy_app, tamper
from bagsites import make_cohort
from processes import left_running

from models.checkpoint import load_checkpoint
from wsi_fl.cli.main import main
from wsi_fl.engines import deployment
from wsi_fl.engines._flower import flower_env
from wsi_fl.engines._processes import Processes, is_running, tail, with_environment
from wsi_fl.site.approval import app_hash


def test_rehearse_help():
    out = subprocess.run([sys.executable, "-m", "wsi_fl", "rehearse", "--help"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    for option in ("--cohort", "--rounds", "--out", "--app", "--approve", "--kill-site", "--unregistered-site",
                   "--policy", "--insecure", "--site-image", "--server-image", "--run-config", "--workdir",
                   "--timeout"):
        assert option in out.stdout, option


def test_rehearse_refuses_bad_options_before_starting_anything(tmp_path, capsys):
    """A site the cohort lacks, a run config that sets what ``--rounds`` sets, or an app that is not wsi-fl's:
    exit 2 with one line, and no process started (no logs written)."""
    make_cohort(tmp_path / "cohort", sizes=(4, 4))
    common = ["rehearse", "--cohort", str(tmp_path / "cohort"), "--out", str(tmp_path / "out")]
    for extra, message in ((["--kill-site", "site_9"], "--kill-site 'site_9': not a site of"),
                           (["--run-config", "num-server-rounds=4"], "set num-server-rounds with --rounds"),
                           (["--app", str(tmp_path)], f"--app {tmp_path}: not the wsi-fl Flower app")):
        work = tmp_path / f"work-{extra[0]}"
        assert main([*common, "--workdir", str(work), *extra]) == 2
        err = capsys.readouterr().err
        assert err.startswith("wsi-fl rehearse: error: ") and message in err and err.count("\n") == 1, err
        assert not list(work.glob("logs/*.log")), "no process was started"


def test_stop_all_stops_an_orphan_started_after_the_snapshot(tmp_path):
    """An app process that a SuperExec starts while the federation stops, and that left the process tree.

    Such a process is in no list taken before the stop; ``stop_all`` finds it by the run's ``FLWR_HOME`` in its
    environment and stops it. The caller, whose environment the orphan's parent was given, is not touched.
    """
    flwr_home = tmp_path / "flwr-home"
    procs = Processes(tmp_path, flower_env(flwr_home))
    pidfile = tmp_path / "orphan.pid"
    # The SuperNode stand-in starts a grandchild in a session of its own, records its PID, and keeps running;
    # the grandchild ignores SIGTERM, so only the SIGKILL round ends it.
    orphan = ("import os, signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
              f"open({str(pidfile)!r}, 'w').write(str(os.getpid())); time.sleep(600)")
    parent = (f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', {orphan!r}], "
              "start_new_session=True); time.sleep(600)")
    procs.start("supernode-site_1", [sys.executable, "-c", parent])
    deadline = time.monotonic() + 30
    while not pidfile.exists() or not pidfile.read_text():
        assert time.monotonic() < deadline, "the orphan did not start"
        time.sleep(0.1)
    orphan_pid = int(pidfile.read_text())
    try:
        os.kill(procs.started["supernode-site_1"].pid, 9)  # its parent dies first: the orphan leaves the tree
        procs.started["supernode-site_1"].wait()
        assert orphan_pid in with_environment(f"FLWR_HOME={flwr_home}")
        procs.stop_all(grace=2)
        assert not is_running(orphan_pid)
        assert left_running(flwr_home) == []
    finally:  # a failure here must not leave the orphan behind for the rest of the suite
        with contextlib.suppress(ProcessLookupError):
            os.kill(orphan_pid, 9)


@pytest.mark.slow
def test_local_deployment_survives_a_killed_supernode(tmp_path):
    """Three SuperNodes on loopback; site_3's SuperNode (and its app processes) is SIGKILLed after round 1.

    The run must still complete all rounds with the two sites left (``min-train-nodes=2``), and every process
    the rehearsal started must be gone afterwards.

    The sites run the genuine app they approved (a stable copy of this checkout), through their own runners
    (``--isolation process``). Flower's install directory of that very release (``$FLWR_HOME/apps/...``, which
    Flower reuses by its name) is planted beforehand, altered to write a marker when its ClientApp is imported:
    it is never loaded at a site (the site runs its installed ClientApp; the bundle is a version check only).
    """
    make_cohort(tmp_path / "cohort")
    out, work = tmp_path / "out", tmp_path / "work"
    genuine = copy_app(tmp_path / "app")
    marker = tmp_path / "planted-bundle-ran"
    planted = work / "flwr-home" / "apps" / f"wsi-fl.wsi-fl.0.1.0.{app_hash(genuine)[7:15]}"
    tamper(copy_app(planted), marker)
    result = deployment.rehearse(
        tmp_path / "cohort", out, rounds=3, workdir=work, timeout=900, kill_site="site_3", kill_after_round=1,
        app=genuine, approve=[genuine],
        run_config="min-available-nodes=3 min-train-nodes=2 min-evaluate-nodes=2 round-timeout=60.0 "
                   "test-frac=0.3 hidden-dim=32 attn-dim=16")
    logs = "\n".join(tail(p) for p in sorted(Path(result["logs"]).glob("*.log")))
    assert result["status"] == "finished:completed", logs
    assert result["app_hash"] == app_hash(genuine) and result["approved"] == [result["app_hash"]]
    assert not marker.exists(), "the altered install directory of an approved release was loaded"
    assert "leaked-slide-count" in (planted / "wsi_fl" / "site" / "app.py").read_text()  # still there, unused
    for site in ("site_1", "site_2"):  # the site-installed ClientApp answered (its guard audited every reply)
        events = [json.loads(x)["event"] for x in Path(result["audit_logs"][site]).read_text().splitlines()]
        assert events.count("sent") >= 7 and "refused" not in events, events
        runner = (Path(result["logs"]) / f"runner-{site}.log").read_text()
        assert "approved by the site policy; running the site-installed ClientApp" in runner
        assert runner.count("site policy from") == 1 and "interrupted" not in runner, runner  # once per runner
    assert result["ok"] and result["rounds_completed"] == 3
    assert result["killed"] == {"site_3": 1}
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2, 3]
    assert rows[0]["aggregated"] == 3 and rows[0]["eval-replies"] == 3, rows[0]
    for row in rows[1:]:  # the dead site: no reply in time, an error reply, or no longer sampled
        assert row["aggregated"] == 2 and row["eval-replies"] == 2, row
        assert row["replies"] - row["failed"] == 2 and row["rejected"] == 0, row
    for name, rounds in (("best.pt", (1, 2, 3)), ("last.pt", (3,))):
        _, ckpt = load_checkpoint(out / name)
        assert ckpt.config.in_dim == 16 and ckpt.config.hidden_dim == 32 and ckpt.classes == ["0", "1"]
        assert ckpt.meta["mode"] == "federated" and ckpt.meta["round"] in rounds
    assert json.loads((work / "run-status.json").read_text())["status"] == "finished:completed"
    # Every SuperLink and SuperNode was stopped (and reaped), and nothing they started is left running.
    assert set(result["pids"]) == {"superlink", *(f"{kind}-site_{k}" for kind in ("supernode", "runner")
                                                   for k in (1, 2, 3))}
    for pid in result["pids"].values():
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    if Path("/proc/self/environ").exists():
        deadline = time.monotonic() + 15  # app processes notice their SuperNode is gone within seconds
        while (left := left_running(work / "flwr-home")) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not left, f"processes left running: {left}"


@pytest.mark.slow
def test_a_tampered_app_is_refused_at_every_site_before_any_of_its_code_runs(tmp_path):
    """The coordinator ships a tampered copy of the app (its ClientApp writes a marker when imported, drops the
    site guard and adds a metric), over TLS with SuperNode authentication; the sites approved the genuine one.

    Every site's runner refuses it before anything of the bundle runs (no marker), the coordinator's run fails
    with each site's one-line reason, nothing the tampered code would send arrives, and every site's audit log
    records the refusal with the bundle's full hash, which is ``wsi-fl app-hash`` of the tampered tree.
    """
    make_cohort(tmp_path / "cohort", sizes=(6, 6, 6))
    out, work, marker = tmp_path / "out", tmp_path / "work", tmp_path / "tampered-code-ran"
    genuine = copy_app(tmp_path / "genuine")
    tampered = tamper(copy_app(tmp_path / "tampered"), marker)
    result = deployment.rehearse(tmp_path / "cohort", out, rounds=1, workdir=work, timeout=600, app=tampered,
                                 approve=[genuine], run_config="min-available-nodes=3 test-frac=0.3 hidden-dim=32")
    logs = Path(result["logs"])
    shipped = app_hash(tampered)
    assert result["app_hash"] == shipped and result["approved"] == [app_hash(genuine)] != [shipped]
    assert not result["ok"] and result["status"] == "finished:failed" and result["rounds_completed"] == 0
    assert not marker.exists(), "code of the tampered bundle ran"
    assert result["tls"] and result["auth"]
    reason = f"refused app {shipped[:19]}…: not an approved release (policy approved-apps)"
    coordinator = (logs / "flwr-run.log").read_text()
    for site in ("site_1", "site_2", "site_3"):
        assert f"could not describe its data: site {site} {reason}\n" in coordinator, coordinator
        [line] = [json.loads(x) for x in Path(result["audit_logs"][site]).read_text().splitlines()]
        assert line["event"] == "refused" and line["app"] == shipped and line["message-type"] == "query", line
        runner = (logs / f"runner-{site}.log").read_text()
        assert f"WARNING wsi_fl.site.runner: site {site} {reason}" in runner, runner
    assert "only 0 of 3 sites described their data" in coordinator
    assert "leaked-slide-count" not in coordinator and not list(out.glob("*.pt"))
    assert not left_running(work / "flwr-home")
