"""The ``wsi-fl`` command: a thin argparse layer over the Python API.

Every subcommand parses its options, calls one library function and turns the
outcome into an exit code: 0 success, 1 some slide failed, 2 bad usage or
input, 130 interrupted (Ctrl-C or SIGTERM).
"""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from wsi_fl import __version__

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


def _raise_interrupt(signum: int, frame: object) -> None:
    from preprocessing.pipeline import request_stop

    request_stop()  # in case the exception below lands somewhere that swallows it (a __del__)
    raise KeyboardInterrupt(f"signal {signum}")


def build_parser() -> argparse.ArgumentParser:
    from wsi_fl.cli import demo as cmd_demo
    from wsi_fl.cli import evaluate as cmd_evaluate
    from wsi_fl.cli import federate as cmd_federate
    from wsi_fl.cli import mil_benchmark as cmd_mil_benchmark
    from wsi_fl.cli import preprocess as cmd_preprocess
    from wsi_fl.cli import synth as cmd_synth
    from wsi_fl.cli import train as cmd_train

    parser = argparse.ArgumentParser(prog="wsi-fl", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"wsi-fl {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in (cmd_synth, cmd_preprocess, cmd_train, cmd_federate, cmd_evaluate, cmd_mil_benchmark, cmd_demo):
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    if argv is None:  # a real process: make CPU torch fast before anything is imported
        from preprocessing.runtime import ensure_fast_allocator

        ensure_fast_allocator()
    args = build_parser().parse_args(argv)
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        print("wsi-fl: interrupted; finished slides are recorded, nothing partial is left", file=sys.stderr)
        return EXIT_INTERRUPTED
    except UsageError as err:
        print(f"wsi-fl {args.command}: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    finally:
        signal.signal(signal.SIGTERM, previous)


class UsageError(Exception):
    """Bad options or inputs detected before any work starts (exit code 2)."""


def existing_file(text: str) -> Path:
    path = Path(text)
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"{text}: no such file")
    return path


if __name__ == "__main__":
    sys.exit(main())
