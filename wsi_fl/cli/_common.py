"""What every subcommand shares: exit codes, the usage error and argparse types.

Kept apart from ``main.py`` so subcommand modules import it without importing
the command itself (that was an import cycle), and kept to the standard
library so ``wsi-fl --help`` stays instant.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from wsi_fl.errors import WsiFlError

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


class UsageError(WsiFlError):
    """Bad options or inputs detected before any work starts (exit code 2)."""


def existing_file(text: str) -> Path:
    """An argparse type: the path must name an existing file, so a typo fails before any work."""
    path = Path(text)
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"{text}: no such file")
    return path


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, not {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def add_threads_option(parser: argparse._ActionsContainer) -> None:
    """``--threads N``: the CPUs a command uses (preprocessing.runtime.use_threads)."""
    parser.add_argument("--threads", type=positive_int, metavar="N",
                        help="CPU threads to use (default: SLURM_CPUS_PER_TASK under SLURM, else the CPUs this "
                             "process may use: its CPU affinity and cgroup quota)")
