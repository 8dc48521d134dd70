"""The processes of a federation rehearsed on one machine: started by name, each in its own session with its own
log, and every one of them stopped again by its PID (:class:`Processes`).

Why so careful: a SuperLink or SuperNode left running holds a port and a
``FLWR_HOME``, and Flower's app processes (``flower-superexec``,
``flwr-serverapp``, ``flwr-clientapp``) can outlive the SuperNode that started
them, leaving the process tree. So processes are found again from Linux's
``/proc`` (by descent, and by the run-local ``FLWR_HOME`` in their environment)
after each signal, and never by name: other federations on the same machine,
a test's or another user's, are not ours to stop.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

HOST = "127.0.0.1"


class LocalFederationError(RuntimeError):
    """The federation could not start or did not end (a process died, a timeout). The message has log tails.

    ``pids`` names every process that was started (all of them stopped again).
    """

    pids: dict[str, int]


def free_port() -> int:
    """A loopback port that is free now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def tail(path: Path, lines: int = 40) -> str:
    """The last ``lines`` lines of a log, headed by its path: what a failure message shows of each process."""
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
            # A session of its own: Ctrl-C in the terminal reaches this process only, which stops them in order.
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
    """Wait until something listens on loopback ``port``; fail early if a process of ``procs`` ended."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        procs.check_alive()
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            if sock.connect_ex((HOST, port)) == 0:
                return
        time.sleep(0.2)
    raise LocalFederationError(f"the SuperLink did not listen on {HOST}:{port} within {timeout:.0f} s")
