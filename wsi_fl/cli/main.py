"""The ``wsi-fl`` command: a thin argparse layer over the Python API.

Every subcommand parses its options, calls one library function and turns the
outcome into an exit code: 0 success, 1 some slide failed, 2 bad usage or
input, 130 interrupted (Ctrl-C or SIGTERM).

Building the parser imports only the standard library and the stdlib-only
config dataclasses the options come from; a subcommand imports its heavy work
(torch, Flower, OpenSlide...) when it runs. So ``wsi-fl --help`` and every
``wsi-fl <command> --help`` answer at once (``tests/cli/test_cli.py`` checks what
they import; ``scripts/bench_startup.py`` times them).
"""

from __future__ import annotations

import argparse
import importlib
import signal
import sys
from collections.abc import Sequence

from preprocessing.errors import PreprocessingError
from wsi_fl import __version__
from wsi_fl.cli._common import EXIT_INTERRUPTED, EXIT_USAGE
from wsi_fl.errors import WsiFlError

#: The subcommands' modules (under wsi_fl.cli), in the order ``--help`` lists them. Each has
#: ``register(sub)``, which adds its parser, and ``run(args) -> int``.
COMMANDS = ("synth", "preprocess", "labels", "train", "federate", "evaluate", "mil_benchmark", "rehearse", "certs",
            "encoders", "app_hash", "check_policy", "site_runner", "demo")

DESCRIPTION = ("Federated attention-MIL on whole-slide images: preprocess slides into features at each\n"
               "hospital, train and evaluate slide-level models, federate them with Flower.")
EPILOG = ("exit codes: 0 success, 1 some item failed (the rest were done), 2 bad options or input, 130 interrupted.\n"
          "`wsi-fl COMMAND --help` lists a command's options.")

#: What a subcommand raises on purpose about its inputs or settings: a one-line message and exit code 2.
#: Anything else is a bug and keeps its traceback.
PROJECT_ERRORS = (WsiFlError, PreprocessingError)


def _raise_interrupt(signum: int, frame: object) -> None:
    from preprocessing.pipeline import request_stop

    request_stop()  # in case the exception below lands somewhere that swallows it (a __del__)
    raise KeyboardInterrupt(f"signal {signum}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="wsi-fl", description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"wsi-fl {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"wsi_fl.cli.{name}").register(sub)
    return parser


def command_names(parser: argparse.ArgumentParser | None = None) -> list[str]:
    """The subcommands as typed on the command line (``synth-cohort``, ``mil-benchmark``...), in ``--help`` order."""
    parser = parser or build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return list(sub.choices)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)  # --help and bad options end here, before anything heavy
    if argv is None:  # a real process: make CPU torch fast before torch is imported
        from preprocessing.runtime import ensure_fast_allocator

        ensure_fast_allocator()
    return dispatch(args)


def dispatch(args: argparse.Namespace) -> int:
    """Run the parsed command (``args.func``) and turn its outcome into an exit code.

    A project error (:data:`PROJECT_ERRORS`) is the user's to fix: one line on stderr, exit code 2. Any
    other exception propagates with its traceback, because it is a bug to report, not a message to read.
    """
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        print("wsi-fl: interrupted; finished work is kept, nothing partial is left", file=sys.stderr)
        return EXIT_INTERRUPTED
    except PROJECT_ERRORS as err:
        message = " ".join(str(err).split()) or type(err).__name__
        print(f"wsi-fl {args.command}: error: {message}", file=sys.stderr)
        return EXIT_USAGE
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
