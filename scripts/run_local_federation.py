"""Run the app as a real Flower deployment on this machine: one SuperLink, one SuperNode per site, ``flwr run``.

The simulation engine (:mod:`wsi_fl.federate`) runs every ClientApp inside one
process it controls. A hospital deployment does not: the SuperLink, each
site's SuperNode, and the ServerApp and ClientApps they launch are separate
processes that talk over the network, the app arrives as a FAB built from
``pyproject.toml``, each site finds its data only through its SuperNode's node
config, and the run config is parsed from ``flwr run --run-config``. This
script rehearses exactly that on loopback, so that what breaks in deployment
(the FAB, imports in the app subprocesses, node config, run config types)
breaks here first, and a test can check it::

    python scripts/run_local_federation.py --cohort demo-out/cohort --rounds 5 --out runs/local

Every process gets a run-local ``FLWR_HOME`` (with the ``config.toml`` that
``flwr`` reads its SuperLink connection from) and Flower's offline settings
(:data:`wsi_fl.federate.OFFLINE_ENV`); ports are free loopback ports, so runs
can go in parallel. ``flwr run --stream`` exits 0 even when the run failed,
so the verdict comes from ``flwr list --format json``. Every process started
here is stopped again (terminate, wait, kill), also on errors, Ctrl-C and
SIGTERM. Logs are under ``--workdir``; on failure their tails are printed.
``--kill-site SITE`` kills that site's SuperNode and its app processes with
SIGKILL once ``--kill-after-round`` rounds are done, as a hospital's machine
failing mid-run would; with ``min-train-nodes`` below the number of sites the
run must still complete.

The federation is **insecure**: plain HTTP on 127.0.0.1, no TLS, no SuperNode
authentication. That is acceptable on loopback only, never across a network.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import tomli_w

PROJECT_ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
CONNECTION = "local-deployment"  # the SuperLink connection's name in the run-local config.toml
INSECURE_WARNING = ("WARNING: insecure local federation (plain HTTP, no TLS, no SuperNode authentication) "
                    f"on {HOST} only; never use these settings across a network.")
#: Run-config keys set by this script's own options (a passthrough --run-config may not set them as well).
OWN_KEYS = ("num-server-rounds", "out-dir", "seed")


class LocalFederationError(RuntimeError):
    """The federation could not start or did not end (a process died, a timeout). The message has log tails.

    ``pids`` names every process that was started (all of them stopped again).
    """

    pids: dict[str, int]


def flower_env(flwr_home: Path) -> dict[str, str]:
    """The environment of every Flower process started here (SuperLink, SuperNodes, ``flwr``), set in one place.

    Offline (no telemetry, update check or dependency installation), a run-local ``FLWR_HOME``, one thread per
    process (five processes or more share the cores), and this interpreter's bin directory first on ``PATH``:
    the SuperLink and SuperNodes start ``flower-superexec`` and the app processes by name.
    """
    from wsi_fl.federate import OFFLINE_ENV  # here and below: wsi_fl and flwr load in seconds, --help at once

    env = {**os.environ, **OFFLINE_ENV, "FLWR_HOME": str(flwr_home), "PYTHONUNBUFFERED": "1"}
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def executable(name: str, env: Mapping[str, str]) -> str:
    found = shutil.which(name, path=env["PATH"])
    if found is None:
        raise LocalFederationError(f"{name} not found on PATH (is flwr installed in this environment?)")
    return found


def free_port() -> int:
    """A loopback port that is free now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def toml_string(value: str) -> str:
    """``value`` quoted for Flower's ``key=value`` parser (which cannot keep a quote of the enclosing kind)."""
    if "'" not in value:
        return f"'{value}'"
    if '"' not in value and "\\" not in value:
        return f'"{value}"'
    raise ValueError(f"{value!r}: a path with both kinds of quotes cannot be passed in a node config")


def node_config(features: Path, labels: Path, site_name: str) -> str:
    """A SuperNode's ``--node-config``: where its site's data is (:func:`wsi_fl.fedsite.site_from_node_config`)."""
    return (f"data-path={toml_string(str(features.resolve()))} labels={toml_string(str(labels.resolve()))} "
            f"site-name={toml_string(site_name)}")


def build_run_config(rounds: int, out: Path, seed: int, n_sites: int, extra: str | None) -> dict[str, Any]:
    """The run config overrides: ours, and ``min-available-nodes`` = all sites unless ``extra`` sets it.

    ``extra`` is parsed as ``flwr run --run-config`` parses it (``"key=value ..."`` or a ``.toml`` file) and
    checked with :class:`~wsi_fl.fedconfig.FedConfig`, so a typo fails before any process starts.
    """
    import click
    from flwr.common.config import parse_config_args

    from wsi_fl.fedconfig import FedConfig

    try:
        passed = parse_config_args([extra]) if extra else {}
    except (click.ClickException, OSError) as err:
        raise ValueError(f"--run-config {extra!r}: {err}") from err
    if extra and not passed:
        raise ValueError(f"--run-config {extra!r} holds no key=value pair")
    clash = sorted(set(passed) & set(OWN_KEYS))
    if clash:
        raise ValueError(f"set {', '.join(clash)} with --rounds/--out/--seed, not in --run-config")
    config = {"min-available-nodes": n_sites, **passed, "num-server-rounds": rounds, "out-dir": str(out),
              "seed": seed}
    FedConfig.from_run_config(config)
    return config


def write_flwr_config(flwr_home: Path, superlink_port: int) -> None:
    """The ``config.toml`` pointing ``flwr`` at our SuperLink (an explicit address, so Flower starts none itself)."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    connection = {"address": f"{HOST}:{superlink_port}", "insecure": True}
    config = {"superlink": {"default": CONNECTION, CONNECTION: connection}}
    (flwr_home / "config.toml").write_text(tomli_w.dumps(config))


def tail(path: Path, lines: int = 40) -> str:
    text = path.read_text(errors="replace").splitlines() if path.is_file() else ["(no log)"]
    return f"--- {path} (last {min(lines, len(text))} lines) ---\n" + "\n".join(text[-lines:])


class Processes:
    """The long-running processes of one federation; each logs to its own file and is stopped by its PID."""

    def __init__(self, logs: Path, env: Mapping[str, str]) -> None:
        self.logs, self.env = logs, dict(env)
        self.started: dict[str, subprocess.Popen[bytes]] = {}
        self.killed: set[str] = set()  # stopped on purpose mid-run: their end is not a failure

    @property
    def pids(self) -> dict[str, int]:
        return {name: proc.pid for name, proc in self.started.items()}

    def start(self, name: str, cmd: Sequence[str]) -> None:
        with (self.logs / f"{name}.log").open("wb") as log:
            # A session of its own: Ctrl-C in the terminal reaches this script only, which stops them in order.
            self.started[name] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                                  cwd=self.logs, start_new_session=True)

    def check_alive(self) -> None:
        for name, proc in self.started.items():
            if name not in self.killed and proc.poll() is not None:
                raise LocalFederationError(f"{name} (pid {proc.pid}) exited with {proc.returncode}\n"
                                           + tail(self.logs / f"{name}.log"))

    def kill(self, name: str) -> None:
        """SIGKILL ``name`` and everything in its session, as a site's machine failing mid-run would (no goodbye)."""
        proc = self.started[name]
        self.killed.add(name)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # its own session (start_new_session): its app processes too
        proc.wait()

    def stop_all(self, grace: float = 10.0) -> None:
        """SuperNodes first, the SuperLink last, then what they started and left: terminate, wait, kill.

        Flower's app processes (``flower-superexec``, ``flwr-serverapp``, ``flwr-clientapp``) end by themselves
        after a run; the ones a run cut short leaves behind are stopped here too, by their PIDs.
        """
        procs = list(reversed(self.started.values()))
        below = [pid for proc in procs if proc.poll() is None for pid in descendants(proc.pid)]
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + grace
        for proc in procs:
            try:
                proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in (pid for pid in below if is_running(pid)):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            deadline = time.monotonic() + grace
            while any(is_running(pid) for pid in below) and time.monotonic() < deadline:
                time.sleep(0.2)


def descendants(pid: int) -> list[int]:
    """The PIDs of every process below ``pid`` (from Linux's /proc; elsewhere none are found)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])  # the fields after "(command)": state, ppid
            children.setdefault(ppid, []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        found += (kids := children.get(todo.pop(), []))
        todo += kids
    return found


def is_running(pid: int) -> bool:
    """Whether ``pid`` (found in /proc) still runs; a zombie has ended."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def wait_for_port(port: int, procs: Processes, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        procs.check_alive()
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            if sock.connect_ex((HOST, port)) == 0:
                return
        time.sleep(0.2)
    raise LocalFederationError(f"the SuperLink did not listen on {HOST}:{port} within {timeout:.0f} s")


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


def run_status(env: Mapping[str, str], run_id: int) -> dict[str, Any]:
    """The run's entry in ``flwr list --format json`` (``status`` is e.g. ``finished:completed``)."""
    cmd = [executable("flwr", env), "list", CONNECTION, "--run-id", str(run_id), "--format", "json"]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, env=dict(env), timeout=120)
    except subprocess.TimeoutExpired as err:
        raise LocalFederationError("flwr list did not answer within 120 s") from err
    try:
        listing = json.loads(out.stdout)
    except json.JSONDecodeError as err:
        raise LocalFederationError(f"flwr list printed no JSON (exit {out.returncode}):\n{out.stdout}{out.stderr}"
                                   ) from err
    runs = [r for r in listing.get("runs", []) if str(r.get("run-id")) == str(run_id)]
    if not listing.get("success", False) or not runs:
        raise LocalFederationError(f"flwr list does not know run {run_id}: {json.dumps(listing)}")
    return runs[0]


def started_run(output: str) -> int | None:
    """The run id ``flwr run`` reported, None if it started none."""
    started = re.search(r"Successfully started run (\d+)", output)
    return int(started.group(1)) if started else None


def read_metrics(out: Path) -> list[dict[str, Any]]:
    """The rounds in ``out/metrics.jsonl`` so far (a last line still being written, without its newline, not yet)."""
    path = out / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().split("\n")[:-1] if line.strip()]


def run_local_federation(cohort: str | Path, out: str | Path, rounds: int, *, seed: int = 0,
                         run_config: str | None = None, workdir: str | Path | None = None,
                         app: str | Path = PROJECT_ROOT, timeout: float = 1800.0,
                         startup_timeout: float = 60.0, kill_site: str | None = None,
                         kill_after_round: int = 1) -> dict[str, Any]:
    """Start a SuperLink and one SuperNode per site of ``cohort``, run ``app`` for ``rounds`` rounds, stop them.

    ``run_config`` (``"key=value ..."``, as for ``flwr run --run-config``) is merged with ``rounds``, ``out`` and
    ``seed``; ``app`` is the Flower app directory the FAB is built from; ``timeout`` bounds the run in seconds.
    ``kill_site`` names a site whose SuperNode (with its app processes) is killed with SIGKILL once
    ``kill_after_round`` rounds are in ``out/metrics.jsonl``: a rehearsal of a hospital dropping out mid-run,
    which the run must survive when ``min-train-nodes`` still holds (its ``round-timeout`` bounds the wait).

    Returns ``ok`` (the run finished completed and ``out/metrics.jsonl`` has ``rounds`` rounds), ``status`` and
    ``run`` (the run's ``flwr list`` entry), ``rounds_completed``, ``test_auc`` (last round), ``pids`` (every
    process started here, all stopped on return), ``killed`` (``{site: round}``, or empty), ``seconds`` (the
    ``flwr run`` wall time), ``out``, ``workdir`` and ``logs``. Raises
    :class:`LocalFederationError` when a process dies, ``flwr run`` fails or the timeout passes.
    """
    from wsi_fl.fedsite import discover_cohort

    sites = discover_cohort(cohort)
    if kill_site is not None and kill_site not in {s.name for s in sites}:
        raise ValueError(f"--kill-site {kill_site!r}: not a site of {cohort} ({', '.join(s.name for s in sites)})")
    out = Path(out).resolve()
    config = build_run_config(rounds, out, seed, len(sites), run_config)
    node_configs = {f"supernode-{s.name}": node_config(s.features_dir, s.labels, s.name) for s in sites}
    work = Path(workdir).resolve() if workdir else Path(tempfile.mkdtemp(prefix="wsi-fl-federation-"))
    logs, flwr_home = work / "logs", work / "flwr-home"
    logs.mkdir(parents=True, exist_ok=True)
    (work / "run-config.toml").write_text(tomli_w.dumps(config))
    link_port = free_port()
    write_flwr_config(flwr_home, link_port)
    procs = Processes(logs, flower_env(flwr_home))
    print(INSECURE_WARNING, file=sys.stderr)
    try:
        procs.start("superlink", [executable("flower-superlink", procs.env), "--insecure", "--host", HOST,
                                  "--port", str(link_port), "--disable-runtime-dependency-installation"])
        wait_for_port(link_port, procs, startup_timeout)
        for name, node_cfg in node_configs.items():
            procs.start(name, [executable("flower-supernode", procs.env), "--insecure",
                               "--superlink", f"{HOST}:{link_port}", "--host", HOST, "--port", str(free_port()),
                               "--node-config", node_cfg])
        print(f"federation up: SuperLink {HOST}:{link_port}, {len(sites)} SuperNodes, logs in {logs}",
              file=sys.stderr)
        killed: dict[str, int] = {}

        def maybe_kill() -> None:
            if kill_site is not None and not killed and len(read_metrics(out)) >= kill_after_round:
                procs.kill(f"supernode-{kill_site}")
                killed[kill_site] = len(read_metrics(out))
                print(f"killed the SuperNode of {kill_site} after round {killed[kill_site]}", file=sys.stderr)

        start = time.monotonic()
        code, output = run_flwr(["run", str(Path(app).resolve()), CONNECTION, "--run-config",
                                 str(work / "run-config.toml"), "--stream"], procs, logs / "flwr-run.log", timeout,
                                on_poll=maybe_kill)
        seconds = time.monotonic() - start
        run_id = started_run(output)
        if code != 0 or run_id is None:
            raise LocalFederationError(f"flwr run failed (exit {code})\n{tail(logs / 'flwr-run.log')}")
        run = run_status(procs.env, run_id)
    except LocalFederationError as err:
        err.pids = procs.pids
        raise
    finally:
        procs.stop_all()
    (work / "run-status.json").write_text(json.dumps(run, indent=2) + "\n")
    history = read_metrics(out)
    return {"ok": run["status"] == "finished:completed" and len(history) == rounds, "status": run["status"],
            "run": run, "rounds": rounds, "rounds_completed": len(history),
            "test_auc": history[-1].get("test-auc") if history else None, "pids": procs.pids, "killed": killed,
            "seconds": round(seconds, 1), "out": str(out),
            "workdir": str(work), "logs": str(logs)}


def summary(result: Mapping[str, Any]) -> str:
    auc = "n/a" if result["test_auc"] is None else f"{result['test_auc']:.4f}"
    details = result["run"].get("status-details", "N/A")
    return (f"{'OK' if result['ok'] else 'FAILED'}: status {result['status']}, rounds {result['rounds_completed']}"
            f"/{result['rounds']}, last test-auc {auc}, out {result['out']}"
            + "".join(f", {site} killed after round {r}" for site, r in result.get("killed", {}).items())
            + ("" if result["ok"] or details == "N/A" else f" ({details})"))


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cohort", type=Path, default=PROJECT_ROOT / "demo-out" / "cohort",
                    help="one subdirectory per site, each with labels.csv and features/ [%(default)s]")
    ap.add_argument("--out", type=Path, required=True, help="the run's out-dir: checkpoints and metrics")
    ap.add_argument("--rounds", type=int, default=3, help="num-server-rounds [%(default)s]")
    ap.add_argument("--seed", type=int, default=0, help="the run's seed [%(default)s]")
    ap.add_argument("--run-config", default=None,
                    help="more run config: \"local-epochs=2 strategy='fedprox'\" or a .toml file")
    ap.add_argument("--workdir", type=Path, default=None, help="logs and FLWR_HOME [a new temporary directory]")
    ap.add_argument("--app", type=Path, default=PROJECT_ROOT, help="the Flower app to run [%(default)s]")
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds the run may take [%(default)s]")
    ap.add_argument("--kill-site", default=None,
                    help="rehearse a dropout: SIGKILL this site's SuperNode mid-run (see --kill-after-round)")
    ap.add_argument("--kill-after-round", type=int, default=1, help="rounds completed before the kill [%(default)s]")
    args = ap.parse_args(argv)
    # SIGTERM ends the script as Ctrl-C does: through the `finally` that stops every process it started.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        result = run_local_federation(args.cohort, args.out, args.rounds, seed=args.seed, run_config=args.run_config,
                                      workdir=args.workdir, app=args.app, timeout=args.timeout,
                                      kill_site=args.kill_site, kill_after_round=args.kill_after_round)
    except (LocalFederationError, ValueError) as err:
        print(f"FAILED: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: every process started here was stopped", file=sys.stderr)
        return 130
    if not result["ok"]:
        logs = Path(result["logs"])
        print("\n".join(tail(p) for p in [logs / "flwr-run.log", *sorted(logs.glob("super*.log"))]), file=sys.stderr)
    print(summary(result))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
