"""Talking to Flower's own commands for a rehearsal: their environment, the ``flwr`` connection, ``flwr run``,
``flwr list`` and ``flwr supernode register``.

Why through the commands and not Flower's Python API: an operator drives a
deployment with exactly these commands, so a rehearsal that uses them catches
what an operator would meet (the FAB ``flwr run`` builds, the run config it
parses, the connection in ``$FLWR_HOME/config.toml``). ``flwr run --stream``
exits 0 even when the run failed, so a run's verdict is read from
``flwr list --format json`` (:func:`run_status`), never from that exit code.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import tomli_w

from wsi_fl.engines._processes import HOST, LocalFederationError, Processes, tail

CONNECTION = "local-deployment"  # the SuperLink connection's name in the run-local config.toml


def flower_env(flwr_home: Path) -> dict[str, str]:
    """The environment of every Flower process started here (SuperLink, SuperNodes, ``flwr``), set in one place.

    Offline (no telemetry, update check or dependency installation), a run-local ``FLWR_HOME``, one thread per
    process (five processes or more share the cores), and this interpreter's bin directory first on ``PATH``:
    the SuperLink and SuperNodes start ``flower-superexec`` and the app processes by name.
    """
    from wsi_fl.engines.simulation import OFFLINE_ENV  # the simulation engine sets the same; imported on use

    env = {**os.environ, **OFFLINE_ENV, "FLWR_HOME": str(flwr_home), "PYTHONUNBUFFERED": "1"}
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def executable(name: str, env: Mapping[str, str]) -> str:
    """The full path of Flower's command ``name`` on ``env``'s PATH: a missing one fails before anything starts."""
    found = shutil.which(name, path=env["PATH"])
    if found is None:
        raise LocalFederationError(f"{name} not found on PATH (is flwr installed in this environment?)")
    return found


def write_flwr_config(flwr_home: Path, superlink_port: int, root_certificates: Path | None = None) -> None:
    """The ``config.toml`` pointing ``flwr`` at our SuperLink (an explicit address, so Flower starts none itself).

    With ``root_certificates`` (the CA that signed the SuperLink's certificate) ``flwr`` connects over TLS;
    without, over plain HTTP (``insecure``).
    """
    flwr_home.mkdir(parents=True, exist_ok=True)
    connection: dict[str, Any] = {"address": f"{HOST}:{superlink_port}", "insecure": root_certificates is None}
    if root_certificates is not None:
        connection["root-certificates"] = str(root_certificates.resolve())  # Flower wants an absolute path
    config = {"superlink": {"default": CONNECTION, CONNECTION: connection}}
    (flwr_home / "config.toml").write_text(tomli_w.dumps(config))


def run_flwr(args: Sequence[str], procs: Processes, log: Path, timeout: float,
             on_poll: Callable[[], None] | None = None) -> tuple[int, str]:
    """``flwr <args>`` with its output in ``log``; (exit code, output). Fails early if a process of ours dies.

    ``on_poll`` is called about twice a second while ``flwr`` runs (e.g. to kill a SuperNode at some round).
    """
    with log.open("w") as out:
        proc = subprocess.Popen([executable("flwr", procs.env), *args], stdout=out, stderr=subprocess.STDOUT,
                                env=procs.env)
        deadline = time.monotonic() + timeout
        try:
            while proc.poll() is None:
                procs.check_alive()
                if time.monotonic() > deadline:
                    raise LocalFederationError(f"flwr {args[0]} did not end within {timeout:.0f} s\n{tail(log)}")
                if on_poll is not None:
                    on_poll()
                time.sleep(0.5)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return proc.returncode, log.read_text(errors="replace")


def flwr_json(env: Mapping[str, str], args: Sequence[str], timeout: float = 120.0) -> dict[str, Any]:
    """``flwr <args> --format json``: its JSON answer (a dict). Raises :class:`LocalFederationError` otherwise."""
    cmd = [executable("flwr", env), *args, "--format", "json"]
    what = f"flwr {' '.join(args[:2])}"
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, env=dict(env), timeout=timeout)
    except subprocess.TimeoutExpired as err:
        raise LocalFederationError(f"{what} did not answer within {timeout:.0f} s") from err
    try:
        answer = json.loads(out.stdout)
    except json.JSONDecodeError as err:
        raise LocalFederationError(f"{what} printed no JSON (exit {out.returncode}):\n{out.stdout}{out.stderr}"
                                   ) from err
    if not isinstance(answer, dict):
        raise LocalFederationError(f"{what} printed {answer!r}, not a JSON object")
    return answer


def run_status(env: Mapping[str, str], run_id: int) -> dict[str, Any]:
    """The run's entry in ``flwr list --format json`` (``status`` is e.g. ``finished:completed``)."""
    listing = flwr_json(env, ["list", CONNECTION, "--run-id", str(run_id)])
    runs = [r for r in listing.get("runs", []) if str(r.get("run-id")) == str(run_id)]
    if not listing.get("success", False) or not runs:
        raise LocalFederationError(f"flwr list does not know run {run_id}: {json.dumps(listing)}")
    return runs[0]


def register_supernode(env: Mapping[str, str], public_key: Path, name: str) -> int:
    """``flwr supernode register``: the SuperLink accepts the SuperNode with this public key; its node id."""
    answer = flwr_json(env, ["supernode", "register", str(public_key), CONNECTION, "--name", name])
    if not answer.get("success", False) or "node-id" not in answer:
        raise LocalFederationError(f"flwr supernode register {public_key} failed: {json.dumps(answer)}")
    return int(answer["node-id"])


def started_run(output: str) -> int | None:
    """The run id ``flwr run`` reported, None if it started none."""
    started = re.search(r"Successfully started run (\d+)", output)
    return int(started.group(1)) if started else None
