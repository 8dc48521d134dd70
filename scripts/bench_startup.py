"""Start-up time of ``wsi-fl --help`` and every ``wsi-fl <command> --help`` (goal: within 3x of a bare
``python -c "import argparse"``).

Each command runs in a fresh process, all of them interleaved round by round;
printed are the median and fastest wall times and each median's ratio to the
baseline's (:mod:`wsi_fl.benchmarks.startup`). The commands read and write
bytecode in a temporary cache, as an installed package would (``--as-is``: in
this shell's environment, e.g. recompiling everything under
``PYTHONDONTWRITEBYTECODE``). Over the goal, find the culprit with
``python -X importtime -m wsi_fl <command> --help``.

    python scripts/bench_startup.py [--repeats 15] [--top-only] [--as-is] [--goal 3] [--check]
"""

from __future__ import annotations

import argparse
import sys
import tempfile

from wsi_fl.benchmarks.startup import default_commands, format_table, installed_env, time_commands


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=15, help="timed rounds (after one warm-up round)")
    ap.add_argument("--top-only", action="store_true", help="time only 'wsi-fl --help', not every command's")
    ap.add_argument("--goal", type=float, default=3.0, help="largest acceptable ratio to the baseline")
    ap.add_argument("--check", action="store_true", help="exit 1 when a command misses the goal")
    ap.add_argument("--as-is", action="store_true", help="this environment's bytecode settings, no private cache")
    args = ap.parse_args()
    commands = default_commands(per_command=not args.top_only)
    with tempfile.TemporaryDirectory(prefix="wsi-fl-pycache-") as cache:
        env = None if args.as_is else installed_env(cache)
        timings = time_commands(commands, repeats=args.repeats, env=env)
    print(f"Python {sys.version.split()[0]}, {args.repeats} rounds, interleaved, bytecode "
          f"{'as this shell has it' if args.as_is else 'cached (as installed)'}; ratio = median / baseline median")
    print(format_table(timings, goal=args.goal))
    missed = [t.name for t in timings if t.ratio > args.goal]
    print(f"goal <= {args.goal:g}x: " + ("met by every command" if not missed else f"missed by {', '.join(missed)}"))
    return 1 if missed and args.check else 0


if __name__ == "__main__":
    sys.exit(main())
