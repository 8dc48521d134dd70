"""How long ``wsi-fl --help`` takes, against a bare ``python -c "import argparse"``.

A command that answers ``--help`` in a few tens of milliseconds feels instant;
one that first imports torch, scikit-learn and Flower takes seconds. The
baseline is the least any argparse program can cost: the interpreter's start
plus argparse. Each command runs in a fresh process (start-up is what is
measured, so nothing may be cached in the measuring process), the commands
interleaved round by round so that a burst of load from other jobs on the
machine falls on all of them alike, and the median of the rounds is reported.

Compiled bytecode is part of what is measured: an installed package has its
``.pyc`` files (pip writes them), but a development shell may set
``PYTHONDONTWRITEBYTECODE`` and then every run compiles every module again
(about half of ``--help``'s time here). :func:`installed_env` gives the commands
a bytecode cache of their own in a temporary directory instead, filled by the
warm-up round, so the figures are those of an installed ``wsi-fl`` without
writing ``__pycache__`` into the source tree.

Standard library only; ``scripts/bench_startup.py`` is the driver.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

BASELINE = "python -c 'import argparse'"


@dataclass(frozen=True)
class StartupTiming:
    name: str
    median_ms: float
    min_ms: float
    ratio: float  # median over the baseline's median
    runs: int


def default_commands(python: str = sys.executable, per_command: bool = True) -> dict[str, list[str]]:
    """The baseline, ``wsi-fl --help`` and (``per_command``) every ``wsi-fl <command> --help``, as argv lists."""
    from wsi_fl.cli.main import command_names

    commands = {BASELINE: [python, "-c", "import argparse"], "wsi-fl --help": [python, "-m", "wsi_fl", "--help"]}
    if per_command:
        for name in command_names():
            commands[f"wsi-fl {name} --help"] = [python, "-m", "wsi_fl", name, "--help"]
    return commands


def installed_env(pycache_dir: str, environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """``environ`` with bytecode written to and read from ``pycache_dir`` (as an installed package has it)."""
    env = {k: v for k, v in environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPYCACHEPREFIX"] = str(pycache_dir)
    return env


def _run_once(argv: Sequence[str], env: Mapping[str, str] | None) -> float:
    start = time.perf_counter()
    done = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited with {done.returncode}: {done.stderr.strip()[-500:]}")
    return elapsed * 1000.0


def time_commands(commands: Mapping[str, Sequence[str]], repeats: int = 15, baseline: str = BASELINE,
                  warmup: int = 1, env: Mapping[str, str] | None = None) -> list[StartupTiming]:
    """Median wall time of each command over ``repeats`` interleaved rounds, and its ratio to ``baseline``.

    ``warmup`` rounds run first and are discarded (they fill the OS file cache, and the bytecode
    cache of :func:`installed_env`, which a user's second call of the day also finds filled).
    ``env`` is the commands' environment (default: this process's).
    """
    if baseline not in commands:
        raise ValueError(f"the baseline {baseline!r} is not one of the commands")
    samples: dict[str, list[float]] = {name: [] for name in commands}
    for round_ in range(warmup + repeats):
        for name, argv in commands.items():
            ms = _run_once(argv, env)
            if round_ >= warmup:
                samples[name].append(ms)
    base = statistics.median(samples[baseline])
    return [StartupTiming(name, statistics.median(ms), min(ms), statistics.median(ms) / base, len(ms))
            for name, ms in samples.items()]


def format_table(timings: Sequence[StartupTiming], goal: float | None = None) -> str:
    width = max(len(t.name) for t in timings)
    lines = [f"{'command':<{width}}  {'median ms':>9}  {'min ms':>7}  {'ratio':>6}"]
    for t in timings:
        flag = "" if goal is None or t.ratio <= goal else f"  > {goal:g}x"
        lines.append(f"{t.name:<{width}}  {t.median_ms:>9.1f}  {t.min_ms:>7.1f}  {t.ratio:>5.2f}x{flag}")
    return "\n".join(lines)
