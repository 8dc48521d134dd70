"""The container images' lock, ``docker/requirements.txt``: the exact versions the Dockerfile installs.

setup.cfg states ranges (what the package works with); an image must be reproducible, so the Dockerfile
installs this lock instead. It is resolved by pip itself (``pip install --dry-run --report``, nothing is
installed) from setup.cfg's ``install_requires``, with ``flwr[dp]`` in place of ``flwr[simulation,dp]``:
SuperNodes and SuperLinks do not run Flower's simulation engine, and Ray is most of its size. ``torch``'s
local version label (``+cpu``) is dropped: the Dockerfile picks the CPU or CUDA build of that version.

A maintainer's tool for a checkout (it reads setup.cfg, which no installed package has); run it as
``python scripts/lock_image_requirements.py [--check]``, the thin driver of :func:`main`. Every function takes
its files as arguments, with the checkout's as defaults, so a test reads the real lock without running pip.
"""

from __future__ import annotations

import argparse
import configparser
import json
import re
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

#: The checkout this module runs from (setup.cfg and docker/ are there, not in an installed wheel).
ROOT = Path(__file__).resolve().parents[2]
SETUP_CFG = ROOT / "setup.cfg"
LOCK = ROOT / "docker" / "requirements.txt"
HEADER = """\
# Exact versions installed in the container images (Dockerfile), so an image built next month is the one tested.
# Resolved from setup.cfg's install_requires with flwr[dp] in place of flwr[simulation,dp] (a SuperNode or
# SuperLink does not need Ray). torch is the CPU or CUDA build by the Dockerfile's TORCH_VARIANT. Regenerate:
#   python scripts/lock_image_requirements.py
"""


def image_requirements(setup_cfg: Path = SETUP_CFG) -> list[str]:
    """setup.cfg's install_requires, with Flower's simulation extra dropped."""
    cfg = configparser.ConfigParser()
    cfg.read(setup_cfg)
    reqs = [line.strip() for line in cfg["options"]["install_requires"].splitlines() if line.strip()]
    return [re.sub(r"^flwr\[[^]]*\]", "flwr[dp]", r) for r in reqs]


def exact_pins(setup_cfg: Path = SETUP_CFG) -> dict[str, str]:
    """The ``name==version`` pins of setup.cfg (torch, torchvision, flwr): the lock must agree with them."""
    pins = {}
    for req in image_requirements(setup_cfg):
        m = re.fullmatch(r"([A-Za-z0-9_.-]+)(?:\[[^]]*\])?==(\S+)", req)
        if m:
            pins[m.group(1).lower()] = m.group(2)
    return pins


def read_lock(path: Path = LOCK) -> dict[str, str]:
    """``{name (lower case): version}`` of the lock file."""
    out = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            out[name.strip().lower()] = version.strip()
    return out


def disagreements(setup_cfg: Path = SETUP_CFG, lock: Path = LOCK) -> dict[str, tuple[str | None, str]]:
    """``{name: (locked version or None, setup.cfg's pin)}`` for every exact pin the lock does not match."""
    locked = read_lock(lock)
    return {n: (locked.get(n), v) for n, v in exact_pins(setup_cfg).items() if locked.get(n) != v}


def resolve(setup_cfg: Path = SETUP_CFG) -> list[tuple[str, str]]:
    """Ask pip what it would install for the image requirements, on a clean slate."""
    with tempfile.TemporaryDirectory() as tmp:
        reqs, report = Path(tmp) / "requirements.in", Path(tmp) / "report.json"
        reqs.write_text("\n".join(image_requirements(setup_cfg)) + "\n")
        subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
                        "--report", str(report), "-r", str(reqs)], check=True)
        items = json.loads(report.read_text())["install"]
    pinned = {(i["metadata"]["name"], i["metadata"]["version"].split("+")[0]) for i in items}
    return sorted(pinned, key=lambda nv: nv[0].lower())


def main(argv: Sequence[str] | None = None) -> int:
    """``lock_image_requirements.py``: rewrite the lock, or with ``--check`` exit 1 if it disagrees with setup.cfg."""
    ap = argparse.ArgumentParser(prog="lock_image_requirements.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="only compare setup.cfg's exact pins with the lock")
    args = ap.parse_args(argv)
    if args.check:
        wrong = disagreements()
        for name, (locked, pinned) in wrong.items():
            print(f"{LOCK}: {name} is {locked or 'missing'}, setup.cfg pins {pinned}", file=sys.stderr)
        return 1 if wrong else 0
    LOCK.write_text(HEADER + "".join(f"{name}=={version}\n" for name, version in resolve()))
    print(f"wrote {LOCK}")
    return 0
