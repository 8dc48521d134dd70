"""The main job's federation prints the server's line per round and real errors, nothing a user must ignore.

What a user must not have to read past (each pattern is named in :data:`NOISE`): Flower's notice that
``run_simulation`` is deprecated, Python deprecation warnings, Flower's banner and INFO log, and Ray's lines
(log lines forwarded from its workers with a ``(ClientAppActor pid=…)`` prefix, its log-deduplication hint, its
start-up messages). The end-to-end check runs ``wsi-fl federate`` as a user does, in its own process, so its
output is exactly what a terminal shows, Ray's workers included.
"""

from __future__ import annotations

import inspect
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from wsi_fl._logging import LOG_LEVEL_ENV, configure_logging
from wsi_fl.engines.simulation import RUN_SIMULATION_DEPRECATED, SITE_ENV, _quiet_engine

ROOT = Path(__file__).resolve().parents[2]

#: Lines a user would have to learn to ignore, by what prints them.
NOISE = {
    "Flower's run_simulation deprecation notice": r"DEPRECATED FEATURE|run_simulation",
    "a Python deprecation or future warning": r"DeprecationWarning|FutureWarning|(?i:deprecat)",
    "Flower's own log (banner, INFO, actor shutdown)":
        r"^(\x1b\[\d+m)?INFO\s*(\x1b\[0m)?\s*:|Starting Flower|\[ROUND \d|Manually terminating",
    "a line forwarded by Ray's log_to_driver": r"\((ClientAppActor|raylet|\w+) pid=\d+\)|\(raylet\)",
    "Ray's log deduplication": r"repeated \d+x across cluster|RAY_DEDUP_LOGS",
    "Ray's start-up or shutdown": r"(?i)\bray\b|Started a local|dashboard",
}
#: Our own log format (wsi_fl._logging); every line on stderr of a clean run is one of these.
OWN_LINE = re.compile(r"^(INFO|WARNING|ERROR) wsi_fl\.[\w.]+: ")


def test_the_deprecation_filter_drops_only_flowers_run_simulation_notice(caplog):
    """Through Flower's own warning function: its run_simulation notice goes, any other Flower warning stays."""
    from flwr.simulation.run_simulation import run_simulation
    from flwr.supercore.logger import warn_deprecated_feature

    assert RUN_SIMULATION_DEPRECATED in inspect.getsource(run_simulation)  # Flower still says so: the filter applies
    with caplog.at_level(logging.WARNING, logger="flwr"):
        with _quiet_engine():
            warn_deprecated_feature(f"{RUN_SIMULATION_DEPRECATED} and will be removed in a future version.")
            warn_deprecated_feature("Some other feature is deprecated.")
        warn_deprecated_feature(f"{RUN_SIMULATION_DEPRECATED} (outside the engine: not ours to hide).")
    shown = [r.getMessage() for r in caplog.records]
    assert len(shown) == 2
    assert "Some other feature is deprecated." in shown[0]
    assert "outside the engine" in shown[1]


def test_simulated_sites_log_warnings_only_and_the_setting_is_undone(monkeypatch):
    for key in SITE_ENV:
        monkeypatch.delenv(key, raising=False)
    with _quiet_engine():
        assert {k: os.environ[k] for k in SITE_ENV} == SITE_ENV  # what Ray's workers inherit when started
    assert not set(SITE_ENV) & set(os.environ)
    monkeypatch.setenv(LOG_LEVEL_ENV, "DEBUG")  # the user's choice is theirs, in every process
    with _quiet_engine():
        assert os.environ[LOG_LEVEL_ENV] == "DEBUG" and os.environ["FLWR_LOG_LEVEL"] == "ERROR"
    assert os.environ[LOG_LEVEL_ENV] == "DEBUG" and "FLWR_LOG_LEVEL" not in os.environ


@pytest.mark.parametrize(("value", "level"), [("warning", logging.WARNING), ("10", logging.DEBUG),
                                              ("", logging.INFO), ("chatty", logging.INFO)])
def test_log_level_from_the_environment(monkeypatch, value, level):
    logger = logging.getLogger("wsi_fl")
    before = logger.level
    monkeypatch.setenv(LOG_LEVEL_ENV, value)
    try:
        configure_logging()
        assert logger.level == level
        configure_logging(logging.ERROR)  # an explicit level wins
        assert logger.level == logging.ERROR
    finally:
        logger.setLevel(before)


@pytest.mark.slow
def test_simulation_prints_one_line_per_round_and_no_noise(cohort, tmp_path, capfd):
    """``wsi-fl federate`` (Flower's simulation engine on Ray), as a user runs it: the round lines, nothing else."""
    env = {k: v for k, v in os.environ.items() if k not in (*SITE_ENV, "RAY_DEDUP_LOGS")}
    cmd = [sys.executable, "-m", "wsi_fl", "federate", "--cohort", str(cohort), "--out", str(tmp_path / "fed"),
           "--num-server-rounds", "2", "--hidden-dim", "16", "--attn-dim", "8", "--min-available-nodes", "3"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, timeout=600)  # its stdout and stderr are this process's: capfd
    out, err = capfd.readouterr()
    assert proc.returncode == 0, out + err
    assert re.findall(r"^INFO wsi_fl\.server: round (\d)/2: 3/3 updates aggregated", err, re.M) == ["1", "2"]
    assert "federated fedavg: 2 rounds" in out
    for what, pattern in NOISE.items():
        found = [line for line in (out + err).splitlines() if re.search(pattern, line, re.M)]
        assert not found, f"{what}: {found}"
    assert [line for line in err.splitlines() if not OWN_LINE.match(line)] == []
