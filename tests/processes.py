"""What a federation left running, read from ``/proc`` independently of the code under test.

Shared by the deployment tests (tests/scenarios, tests/deploy): the check that every SuperLink/SuperNode was
stopped must not trust the library's own bookkeeping (``wsi_fl.engines._processes``).
"""

from __future__ import annotations

from pathlib import Path


def left_running(flwr_home: Path) -> list[int]:
    """PIDs of live processes (not zombies) with this ``FLWR_HOME``: whatever a federation left behind."""
    needle, found = f"FLWR_HOME={flwr_home}".encode(), []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
            if state != "Z" and needle in (proc / "environ").read_bytes().split(b"\0"):
                found.append(int(proc.name))
        except (OSError, IndexError):
            continue
    return found
