"""Run a Flower process inside a wsi-fl image (``podman run`` or ``docker run``), for rehearsals on one host.

The images (``Dockerfile``: targets ``site`` and ``server``) run as the non-root user 49999. A rehearsal
mounts every host path a process needs *at the same path* inside its container, so node configs,
certificate paths and the ServerApp's ``out-dir`` mean the same on both sides, and shares the host's network,
so a federation on loopback works unchanged. Only the paths named are visible: the site's data read-only,
its audit log's directory writable.

Ownership: run by root (rootful podman, as on this project's machines), the container user 49999 owns
nothing on the host, so :func:`grant` gives it the files it must read (private keys are mode 0600) and the
directories it writes. Run by another user with rootless podman, ``--userns keep-id`` maps the container
user to the caller, and nothing needs to change hands.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

#: The images' user and group (as Flower's own images).
IMAGE_UID = 49999
#: Explicit limits: podman's defaults exceed what an unprivileged container host (or a container) may set.
ULIMITS = ("nofile=16384:16384", "nproc=8192:8192")


@dataclass(frozen=True)
class Mount:
    """A host path, mounted at the same path in the container; read-only unless ``writable``."""

    path: Path
    writable: bool = False

    def arg(self) -> str:
        path = Path(self.path).resolve()
        return f"{path}:{path}:{'rw' if self.writable else 'ro'}"


def container_engine(environ: Mapping[str, str] = os.environ) -> str:
    """``$WSI_FL_CONTAINER_ENGINE`` or podman; a one-line error if it is not installed."""
    engine = environ.get("WSI_FL_CONTAINER_ENGINE", "podman")
    if shutil.which(engine) is None:
        raise FileNotFoundError(f"container engine {engine!r} not found (apt-get install podman, or set "
                                "WSI_FL_CONTAINER_ENGINE=docker)")
    return engine


def run_argv(name: str, image: str, argv: Sequence[str], mounts: Iterable[Mount], *, engine: str = "podman",
             env: Mapping[str, str] | None = None, network: str = "host") -> list[str]:
    """The ``ENGINE run`` command that runs ``argv`` (a program on the image's PATH and its arguments).

    ``network``: ``host`` (a federation on loopback) or ``none`` (preprocessing needs no network at all).
    """
    cmd = [engine, "run", "--rm", "--name", name, "--network", network]
    for limit in ULIMITS:
        cmd += ["--ulimit", limit]
    if engine.endswith("podman") and os.geteuid() != 0:
        cmd += ["--userns", "keep-id"]
    for mount in mounts:
        cmd += ["--volume", mount.arg()]
    for key, value in (env or {}).items():
        cmd += ["--env", f"{key}={value}"]
    return [*cmd, "--entrypoint", argv[0], image, *argv[1:]]


def grant(readable: Iterable[Path] = (), writable: Iterable[Path] = ()) -> None:
    """Give the image's user the files it must read and the directories (with contents) it writes; root only.

    Without root nothing is changed (rootless podman maps the container user to the caller).
    """
    if os.geteuid() != 0:
        return
    for path in readable:
        os.chown(path, IMAGE_UID, IMAGE_UID)
    for top in writable:
        top = Path(top)
        top.mkdir(parents=True, exist_ok=True)
        for path in [top, *top.rglob("*")]:
            os.chown(path, IMAGE_UID, IMAGE_UID, follow_symlinks=False)


def remove(engine: str, name: str, grace: int = 5) -> None:
    """Stop (SIGTERM, then SIGKILL after ``grace`` s) and remove container ``name``, if it still exists."""
    subprocess.run([engine, "stop", "--time", str(grace), name], capture_output=True, timeout=grace + 60)
    subprocess.run([engine, "rm", "--force", name], capture_output=True, timeout=60)


def kill(engine: str, name: str) -> None:
    """SIGKILL container ``name``: a site's machine failing mid-run."""
    subprocess.run([engine, "kill", "--signal", "KILL", name], capture_output=True, timeout=60)
