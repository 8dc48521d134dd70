"""Run the app as a real Flower deployment on this machine: one SuperLink, one SuperNode per site, ``flwr run``.

The simulation engine (:mod:`wsi_fl.engines.simulation`) runs every ClientApp inside one
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
(:data:`wsi_fl.engines.simulation.OFFLINE_ENV`); ports are free loopback ports, so runs
can go in parallel. ``flwr run --stream`` exits 0 even when the run failed,
so the verdict comes from ``flwr list --format json``. Every process started
here is stopped again (terminate, wait, kill), also on errors, Ctrl-C and
SIGTERM. Logs are under ``--workdir``; on failure their tails are printed.
``--kill-site SITE`` kills that site's SuperNode and its app processes with
SIGKILL once ``--kill-after-round`` rounds are done, as a hospital's machine
failing mid-run would; with ``min-train-nodes`` below the number of sites the
run must still complete.

**TLS and SuperNode authentication are on by default**, as across a hospital
network. A CA and a server certificate for ``localhost``/``127.0.0.1`` are
written to ``WORKDIR/tls`` (:mod:`wsi_fl.deploy.certs`; ``scripts/make_certs.py``
writes the same for real hosts): the SuperLink serves HTTPS with
``--ssl-ca-certfile/--ssl-certfile/--ssl-keyfile``, SuperNodes verify it with
``--root-certificates``, and ``flwr`` with ``root-certificates`` in its
connection. The SuperLink runs with ``--enable-supernode-auth``: only SuperNodes
whose public key was registered with ``flwr supernode register`` may connect.
Each site gets an EC key pair in ``WORKDIR/tls/supernodes`` (the SuperNode signs
its requests with ``--auth-supernode-private-key``); its public key is registered
once the SuperLink is up. ``--unregistered-site SITE`` also starts an impostor
SuperNode for SITE with a key that was never registered, which the SuperLink must
refuse (the impostor stops with status 1, logging Flower's exit code 305 and
``[code: 2004] Failed to activate SuperNode``) while the registered sites train. Each SuperNode's own Runtime API
for its ClientApps stays plain HTTP on 127.0.0.1, inside the site's machine.

``--insecure`` runs the old way: plain HTTP, no TLS, no SuperNode authentication.
That is acceptable on loopback only, never across a network.
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
from typing import TYPE_CHECKING, Any

import tomli_w

if TYPE_CHECKING:
    from wsi_fl.deploy.certs import NodeKeyPair

PROJECT_ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
CONNECTION = "local-deployment"  # the SuperLink connection's name in the run-local config.toml
UNREGISTERED = "unregistered-"  # prefix of the process name of a SuperNode whose key was never registered
#: How Flower 1.41 reports a SuperNode the SuperLink does not know (exit code 305, API error 2004).
REFUSED_MARKERS = ("Exit Code: 305", "[code: 2004] Failed to activate SuperNode")
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
    from wsi_fl.engines.simulation import OFFLINE_ENV  # here and below: wsi_fl and flwr load in seconds, --help at once

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


def node_config(features: Path, labels: Path, site_name: str, **extra: str) -> str:
    """A SuperNode's ``--node-config``: where its site's data is (:func:`wsi_fl.site.data.site_from_node_config`).

    ``extra``: more string keys (``superlink``, ``policy``, ``audit_log`` for ``audit-log``).
    """
    pairs = {"data-path": str(features.resolve()), "labels": str(labels.resolve()), "site-name": site_name,
             **{k.replace("_", "-"): v for k, v in extra.items()}}
    return " ".join(f"{k}={toml_string(v)}" for k, v in pairs.items())


def site_policy(policy: str | Path | None, superlink: str, work: Path) -> Path:
    """The policy file every SuperNode gets; ValueError (one line) if it does not allow ``superlink``.

    Without ``policy`` it is the rehearsal policy (:func:`wsi_fl.site.policy.rehearsal_policy`: synthetic sites of
    a few slides, evaluation reported) restricted to this SuperLink, written to ``work/site-policy.toml``.
    """
    from dataclasses import replace

    from wsi_fl.site.policy import load_policy, rehearsal_policy

    if policy is None:
        path = work / "site-policy.toml"
        path.write_text(tomli_w.dumps(replace(rehearsal_policy(), superlink=(superlink,)).to_dict()))
        return path
    path = Path(policy).resolve()
    allowed = load_policy(path)  # PolicyError is a ValueError: a bad file stops here, before any process starts
    if not allowed.allows_superlink(superlink):
        raise ValueError(f"--policy {path}: SuperLink {superlink} is not allowed (superlink: "
                         f"{', '.join(allowed.superlink)}); no SuperNode started")
    return path


def build_run_config(rounds: int, out: Path, seed: int, n_sites: int, extra: str | None) -> dict[str, Any]:
    """The run config overrides: ours, and ``min-available-nodes`` = all sites unless ``extra`` sets it.

    ``extra`` is parsed as ``flwr run --run-config`` parses it (``"key=value ..."`` or a ``.toml`` file) and
    checked with :class:`~wsi_fl.federation.config.FedConfig`, so a typo fails before any process starts.
    """
    import click
    from flwr.common.config import parse_config_args

    from wsi_fl.federation.config import FedConfig

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


def tail(path: Path, lines: int = 40) -> str:
    text = path.read_text(errors="replace").splitlines() if path.is_file() else ["(no log)"]
    return f"--- {path} (last {min(lines, len(text))} lines) ---\n" + "\n".join(text[-lines:])


class Processes:
    """The long-running processes of one federation; each logs to its own file and is stopped by its PID.

    A process may be a container (``podman run`` in the foreground): it is then also killed and removed by its
    container name, since signals to the engine's client do not always reach the container.
    """

    def __init__(self, logs: Path, env: Mapping[str, str], engine: str = "podman") -> None:
        self.logs, self.env, self.engine = logs, dict(env), engine
        self.started: dict[str, subprocess.Popen[bytes]] = {}
        self.containers: dict[str, str] = {}  # process name -> container name
        self.killed: set[str] = set()  # stopped on purpose mid-run: their end is not a failure
        self.may_exit: set[str] = set()  # expected to end by themselves (a SuperNode the SuperLink refuses)

    @property
    def pids(self) -> dict[str, int]:
        return {name: proc.pid for name, proc in self.started.items()}

    def start(self, name: str, cmd: Sequence[str], container: str | None = None) -> None:
        if container is not None:
            self.containers[name] = container
        with (self.logs / f"{name}.log").open("wb") as log:
            # A session of its own: Ctrl-C in the terminal reaches this script only, which stops them in order.
            self.started[name] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                                  cwd=self.logs, start_new_session=True)

    def check_alive(self) -> None:
        for name, proc in self.started.items():
            if name not in self.killed | self.may_exit and proc.poll() is not None:
                raise LocalFederationError(f"{name} (pid {proc.pid}) exited with {proc.returncode}\n"
                                           + tail(self.logs / f"{name}.log"))

    def kill(self, name: str) -> None:
        """SIGKILL ``name`` and everything in its session, as a site's machine failing mid-run would (no goodbye)."""
        proc = self.started[name]
        self.killed.add(name)
        if name in self.containers:
            from wsi_fl.deploy.containers import kill

            kill(self.engine, self.containers[name])
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # its own session (start_new_session): its app processes too
        proc.wait()

    def stop_all(self, grace: float = 10.0) -> None:
        """SuperNodes first, the SuperLink last, then what they started and left: terminate, wait, kill.

        Flower's app processes (``flower-superexec``, ``flwr-serverapp``, ``flwr-clientapp``) end by themselves
        after a run; the ones a run cut short leaves behind are stopped here too. A SuperExec may start an app
        process while the others stop, and an orphan leaves the process tree, so they are found again after
        each signal by this run's own ``FLWR_HOME`` in their environment, not only from a list taken before.
        """
        procs = list(reversed(self.started.values()))
        below = {pid for proc in procs if proc.poll() is None for pid in descendants(proc.pid)}
        if self.containers:
            from wsi_fl.deploy.containers import remove

            for name in reversed(self.containers):
                remove(self.engine, self.containers[name], grace=int(grace))
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
        marker = f"FLWR_HOME={self.env['FLWR_HOME']}" if "FLWR_HOME" in self.env else None

        def left() -> set[int]:
            return {pid for pid in below | with_environment(marker) if is_running(pid)}

        for sig in (signal.SIGTERM, signal.SIGTERM, signal.SIGKILL, signal.SIGKILL):
            if not (pids := left()):
                return
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            deadline = time.monotonic() + grace / 2
            while left() and time.monotonic() < deadline:
                time.sleep(0.2)
        if pids := left():
            print(f"warning: processes of this federation still running after SIGKILL: {sorted(pids)}",
                  file=sys.stderr)


def with_environment(entry: str | None) -> set[int]:
    """The PIDs of processes whose environment holds ``entry`` (``NAME=value``; from /proc), this one and its
    ancestors excepted (a shell that exported the same ``FLWR_HOME`` is not ours to stop)."""
    if entry is None:
        return set()
    needle, found = entry.encode(), set()
    for environ in Path("/proc").glob("[0-9]*/environ"):
        with contextlib.suppress(OSError, ValueError):  # another user's process, or one that just ended
            if needle in environ.read_bytes().split(b"\0"):
                found.add(int(environ.parent.name))
    return found - ancestors()


def ancestors() -> set[int]:
    """This process and the ones above it (from Linux's /proc; elsewhere only this one)."""
    found, pid = set(), os.getpid()
    while pid > 1 and pid not in found:
        found.add(pid)
        try:
            pid = int(proc_stat(pid)[1])
        except (OSError, IndexError, ValueError):
            break
    return found


def proc_stat(pid: int) -> list[str]:
    """The fields of ``/proc/PID/stat`` after "(command)": state, ppid, ... (OSError if there is no such process)."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def descendants(pid: int) -> list[int]:
    """The PIDs of every process below ``pid`` (from Linux's /proc; elsewhere none are found)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            ppid = int(proc_stat(int(stat.parent.name))[1])
            children.setdefault(ppid, []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        found += (kids := children.get(todo.pop(), []))
        todo += kids
    return found


def is_running(pid: int) -> bool:
    """Whether ``pid`` (found in /proc) still runs; a zombie has ended."""
    try:
        return proc_stat(pid)[0] != "Z"
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


def refusal(procs: Processes, name: str, timeout: float) -> dict[str, Any]:
    """Wait up to ``timeout`` s for SuperNode ``name`` to end; whether it ended as one the SuperLink refused.

    Flower 1.41's SuperNode with an unregistered key ends with exit status 1 after logging ``Exit Code: 305``
    and ``[code: 2004] Failed to activate SuperNode`` (the SuperLink answers its ActivateNode with HTTP 412).
    """
    proc, log = procs.started[name], procs.logs / f"{name}.log"
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        procs.check_alive()
        time.sleep(0.2)
    code = proc.poll()
    text = log.read_text(errors="replace") if log.is_file() else ""
    found = [marker for marker in REFUSED_MARKERS if marker in text]
    return {"refused": code not in (None, 0) and len(found) == len(REFUSED_MARKERS), "exit_code": code,
            "reason": " / ".join(found) or ("still running" if code is None else f"exited with {code}")}


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
                         kill_after_round: int = 1, insecure: bool = False,
                         unregistered_site: str | None = None, policy: str | Path | None = None,
                         site_image: str | None = None, server_image: str | None = None) -> dict[str, Any]:
    """Start a SuperLink and one SuperNode per site of ``cohort``, run ``app`` for ``rounds`` rounds, stop them.

    ``run_config`` (``"key=value ..."``, as for ``flwr run --run-config``) is merged with ``rounds``, ``out`` and
    ``seed``; ``app`` is the Flower app directory the FAB is built from; ``timeout`` bounds the run in seconds.
    ``kill_site`` names a site whose SuperNode (with its app processes) is killed with SIGKILL once
    ``kill_after_round`` rounds are in ``out/metrics.jsonl``: a rehearsal of a hospital dropping out mid-run,
    which the run must survive when ``min-train-nodes`` still holds (its ``round-timeout`` bounds the wait).

    By default every connection is TLS (a CA and server certificate written to ``workdir/tls``) and the
    SuperLink admits only the SuperNodes whose public keys were registered (one key pair per site in
    ``workdir/tls/supernodes``); ``insecure=True`` runs plain HTTP without SuperNode authentication.
    ``unregistered_site`` names a site for which one more SuperNode is started with a key that was never
    registered; the SuperLink must refuse it (``result["unregistered"]["refused"]``).

    Every SuperNode's node config names the SuperLink (``superlink``), a site policy (``policy``: the file
    ``policy``, which must allow this SuperLink, else the rehearsal policy; see :func:`site_policy`) and its audit
    log (``audit-log``: ``workdir/sites/SITE/audit.jsonl``; ``result["audit_logs"]``).

    ``site_image`` / ``server_image`` run the SuperNodes / the SuperLink in those images (the Dockerfile's
    ``site`` and ``server`` targets) instead of this environment, with ``podman`` (or
    ``$WSI_FL_CONTAINER_ENGINE``) on the host network; each container sees only its own files
    (:mod:`wsi_fl.deploy.containers`): a site its features, labels, policy, CA certificate and private key read-only
    and its audit-log directory writable; the SuperLink its certificate files and ``out``.

    Returns ``ok`` (the run finished completed, ``out/metrics.jsonl`` has ``rounds`` rounds, and an
    ``unregistered_site``'s SuperNode was refused), ``status`` and
    ``run`` (the run's ``flwr list`` entry), ``rounds_completed``, ``test_auc`` (last round), ``pids`` (every
    process started here, all stopped on return), ``killed`` (``{site: round}``, or empty), ``seconds`` (the
    ``flwr run`` wall time), ``out``, ``workdir``, ``logs``, ``tls`` and ``auth`` (both ``not insecure``),
    ``nodes`` (``{site: node id}`` of the registered SuperNodes; empty when insecure), ``containers``
    (``{process: container name}``, empty without images) and ``unregistered``
    (None, or ``site``, ``refused``, ``exit_code`` and ``reason``: the log lines that show the refusal). Raises
    :class:`LocalFederationError` when a process dies, ``flwr run`` fails or the timeout passes.
    """
    from wsi_fl.site.data import discover_cohort

    sites = discover_cohort(cohort)
    if kill_site is not None and kill_site not in {s.name for s in sites}:
        raise ValueError(f"--kill-site {kill_site!r}: not a site of {cohort} ({', '.join(s.name for s in sites)})")
    if unregistered_site is not None and unregistered_site not in {s.name for s in sites}:
        raise ValueError(f"--unregistered-site {unregistered_site!r}: not a site of {cohort} "
                         f"({', '.join(s.name for s in sites)})")
    if unregistered_site is not None and insecure:
        raise ValueError("--unregistered-site needs SuperNode authentication, which --insecure turns off")
    out = Path(out).resolve()
    config = build_run_config(rounds, out, seed, len(sites), run_config)
    impostor = UNREGISTERED + unregistered_site if unregistered_site is not None else None
    work = Path(workdir).resolve() if workdir else Path(tempfile.mkdtemp(prefix="wsi-fl-federation-"))
    logs, flwr_home = work / "logs", work / "flwr-home"
    logs.mkdir(parents=True, exist_ok=True)
    (work / "run-config.toml").write_text(tomli_w.dumps(config))
    link_port = free_port()
    policy_file = site_policy(policy, f"{HOST}:{link_port}", work)
    audit_logs = {s.name: str(work / "sites" / s.name / "audit.jsonl") for s in sites}
    node_configs = {s.name: node_config(s.features_dir, s.labels, s.name, superlink=f"{HOST}:{link_port}",
                                        policy=str(policy_file), audit_log=audit_logs[s.name]) for s in sites}
    # The SuperNodes to start: process name -> (site, TLS and authentication arguments).
    supernodes: dict[str, tuple[str, list[str]]] = {f"supernode-{site}": (site, ["--insecure"])
                                                    for site in node_configs}
    link_tls: list[str] = ["--insecure"]
    keys: dict[str, NodeKeyPair] = {}  # each site's authentication key pair, registered with the SuperLink
    link_files: list[Path] = []  # what the SuperLink reads: its certificate and key, the CA
    node_files: dict[str, list[Path]] = {name: [] for name in supernodes}  # what each SuperNode reads
    private_keys: list[Path] = []  # of the files above, those only their owner may read (mode 0600)
    if insecure:
        write_flwr_config(flwr_home, link_port)
        print(INSECURE_WARNING, file=sys.stderr)
    else:
        from wsi_fl.deploy.certs import write_supernode_keys, write_tls_certificates

        tls = write_tls_certificates(work / "tls", ["localhost", HOST], overwrite=True)
        write_flwr_config(flwr_home, link_port, tls.ca_cert)
        link_tls = ["--ssl-ca-certfile", str(tls.ca_cert), "--ssl-certfile", str(tls.server_cert),
                    "--ssl-keyfile", str(tls.server_key), "--enable-supernode-auth"]
        keys = write_supernode_keys(work / "tls" / "supernodes", list(node_configs), overwrite=True)
        private = {f"supernode-{site}": pair.private_key for site, pair in keys.items()}
        if impostor is not None and unregistered_site is not None:  # a fresh key pair nobody registers
            pairs = write_supernode_keys(work / "tls" / "unregistered", [unregistered_site], overwrite=True)
            private[impostor] = pairs[unregistered_site].private_key
            supernodes[impostor] = (unregistered_site, [])
        supernodes = {name: (site, ["--root-certificates", str(tls.ca_cert),
                                    "--auth-supernode-private-key", str(private[name])])
                      for name, (site, _) in supernodes.items()}
        link_files = [tls.ca_cert, tls.server_cert, tls.server_key]
        node_files = {name: [tls.ca_cert, private[name]] for name in supernodes}
        private_keys = [tls.server_key, *private.values()]
    from wsi_fl.deploy import containers

    engine = containers.container_engine() if site_image or server_image else "podman"
    procs = Processes(logs, flower_env(flwr_home), engine)
    by_name = {s.name: s for s in sites}
    if site_image or server_image:
        containers.grant(readable=private_keys, writable=[out, *(Path(audit_logs[site]).parent for site in by_name)])

    def command(name: str, program: str, args: list[str], image: str | None,
                mounts: list[containers.Mount]) -> tuple[list[str], str | None]:
        """``program args`` here, or in a container of ``image`` that sees only ``mounts``."""
        if image is None:
            return [executable(program, procs.env), *args], None
        container = f"wsi-fl-{name}-{link_port}"
        return containers.run_argv(container, image, [program, *args], mounts, engine=engine,
                                   env={"OMP_NUM_THREADS": procs.env["OMP_NUM_THREADS"]}), container
    nodes: dict[str, int] = {}
    unregistered: dict[str, Any] | None = None
    try:
        procs.start("superlink", *command(
            "superlink", "flower-superlink", [*link_tls, "--host", HOST, "--port", str(link_port),
                                              "--disable-runtime-dependency-installation"],
            server_image, [containers.Mount(f) for f in link_files] + [containers.Mount(out, writable=True)]))
        wait_for_port(link_port, procs, startup_timeout)
        for site, pair in keys.items():
            nodes[site] = register_supernode(procs.env, pair.public_key, site)
        if impostor is not None:
            procs.may_exit.add(impostor)  # the SuperLink should refuse it, and then it ends
        for name, (site, security_args) in supernodes.items():
            mounts = [containers.Mount(p) for p in (by_name[site].features_dir, by_name[site].labels, policy_file,
                                                    *node_files[name])]
            procs.start(name, *command(
                name, "flower-supernode", [*security_args, "--superlink", f"{HOST}:{link_port}", "--host", HOST,
                                           "--port", str(free_port()), "--node-config", node_configs[site]],
                site_image, [*mounts, containers.Mount(Path(audit_logs[site]).parent, writable=True)]))
        security = "insecure" if insecure else f"TLS, {len(nodes)} registered SuperNode keys"
        print(f"federation up ({security}): SuperLink {HOST}:{link_port}, {len(sites)} SuperNodes, logs in {logs}",
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
        if impostor is not None and unregistered_site is not None:  # it was refused long ago, or runs still
            unregistered = {"site": unregistered_site, **refusal(procs, impostor, startup_timeout)}
            print(f"unregistered SuperNode for {unregistered_site}: "
                  f"{'refused' if unregistered['refused'] else 'NOT refused'} ({unregistered['reason']})",
                  file=sys.stderr)
    except LocalFederationError as err:
        err.pids = procs.pids
        raise
    finally:
        procs.stop_all()
    (work / "run-status.json").write_text(json.dumps(run, indent=2) + "\n")
    history = read_metrics(out)
    refused = unregistered is None or unregistered["refused"]
    return {"ok": run["status"] == "finished:completed" and len(history) == rounds and refused,
            "status": run["status"],
            "run": run, "rounds": rounds, "rounds_completed": len(history),
            "test_auc": history[-1].get("test-auc") if history else None, "pids": procs.pids, "killed": killed,
            "seconds": round(seconds, 1), "out": str(out),
            "workdir": str(work), "logs": str(logs), "tls": not insecure, "auth": not insecure, "nodes": nodes,
            "unregistered": unregistered, "policy": str(policy_file), "audit_logs": audit_logs,
            "containers": dict(procs.containers)}


def summary(result: Mapping[str, Any]) -> str:
    auc = "n/a" if result["test_auc"] is None else f"{result['test_auc']:.4f}"
    details = result["run"].get("status-details", "N/A")
    return (f"{'OK' if result['ok'] else 'FAILED'}: status {result['status']}, rounds {result['rounds_completed']}"
            f"/{result['rounds']}, last test-auc {auc}, out {result['out']}"
            + "".join(f", {site} killed after round {r}" for site, r in result.get("killed", {}).items())
            + ("" if not result.get("unregistered") else
               f", unregistered SuperNode for {result['unregistered']['site']} "
               + ("refused" if result["unregistered"]["refused"] else "NOT refused"))
            + (", TLS and SuperNode authentication" if result.get("tls") else ", insecure")
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
    ap.add_argument("--insecure", action="store_true",
                    help="plain HTTP without TLS or SuperNode authentication (loopback only) [TLS and auth on]")
    ap.add_argument("--unregistered-site", default=None,
                    help="also start a SuperNode for this site with an unregistered key; the SuperLink must refuse it")
    ap.add_argument("--policy", type=Path, default=None,
                    help="site policy file for every SuperNode; it must allow this SuperLink [a rehearsal policy]")
    ap.add_argument("--site-image", default=None,
                    help="run the SuperNodes in this image (e.g. localhost/wsi-fl-site:latest) [this environment]")
    ap.add_argument("--server-image", default=None,
                    help="run the SuperLink in this image (e.g. localhost/wsi-fl-server:latest) [this environment]")
    args = ap.parse_args(argv)
    # SIGTERM ends the script as Ctrl-C does: through the `finally` that stops every process it started.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        result = run_local_federation(args.cohort, args.out, args.rounds, seed=args.seed, run_config=args.run_config,
                                      workdir=args.workdir, app=args.app, timeout=args.timeout,
                                      kill_site=args.kill_site, kill_after_round=args.kill_after_round,
                                      insecure=args.insecure, unregistered_site=args.unregistered_site,
                                      policy=args.policy, site_image=args.site_image,
                                      server_image=args.server_image)
    except (LocalFederationError, ValueError, FileNotFoundError) as err:
        print(f"FAILED: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: every process started here was stopped", file=sys.stderr)
        return 130
    if not result["ok"]:
        logs = Path(result["logs"])
        print("\n".join(tail(p) for p in [logs / "flwr-run.log", *sorted(logs.glob("super*.log")),
                                      *sorted(logs.glob(f"{UNREGISTERED}*.log"))]), file=sys.stderr)
    print(summary(result))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
