"""The ``wsi-fl`` command itself: instant ``--help``, stdlib-only configs, defaults written once, error mapping.

Imports are checked in fresh interpreters (``sys.executable -c``): this test
process has long since imported torch, so its ``sys.modules`` proves nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys

import pytest

from models.config import MILConfig
from wsi_fl.benchmarks.mil_config import BenchmarkConfig
from wsi_fl.cli._args import dataclass_from_args
from wsi_fl.cli.main import COMMANDS, PROJECT_ERRORS, build_parser, command_names, dispatch
from wsi_fl.errors import ConfigError, WsiFlError
from wsi_fl.evaluation.options import EvalOptions
from wsi_fl.mil.config import SplitConfig, TrainConfig

#: What --help must never import (the issue's list, and the other heavy dependencies of the project).
HEAVY = ("torch", "sklearn", "scipy", "skimage", "matplotlib", "flwr", "numpy", "h5py", "openslide", "ray", "PIL",
         "tqdm", "cryptography")

#: The modules the CLI reads its options from; they may import the standard library and the project only.
CONFIG_MODULES = ("models.config", "wsi_fl.mil.config", "wsi_fl.federation.config", "preprocessing.params",
                  "wsi_fl.evaluation.options", "wsi_fl.benchmarks.mil_config", "wsi_fl.errors",
                  "preprocessing.errors", "wsi_fl.cli._args", "wsi_fl.cli._common")
PROJECT_PACKAGES = ("wsi_fl", "models", "preprocessing")


def _fresh(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_every_command_module_registers_one_command():
    assert len(command_names()) == len(COMMANDS)
    assert command_names()[0] == "synth-cohort" and "mil-benchmark" in command_names()


@pytest.mark.parametrize("command", [None, *command_names()], ids=lambda c: c or "top")
def test_help_imports_nothing_heavy(command):
    argv = [command, "--help"] if command else ["--help"]
    run = _fresh(f"""
import json, sys
from wsi_fl.cli.main import main
try:
    main({argv!r})
except SystemExit as exit:
    code = exit.code
print(json.dumps({{"code": code, "heavy": sorted(m for m in {HEAVY!r} if m in sys.modules)}}))
""")
    assert run.returncode == 0, run.stderr
    usage, result = run.stdout.split("\n{")[0], json.loads("{" + run.stdout.split("\n{")[-1])
    assert result == {"code": 0, "heavy": []}
    assert usage.startswith(f"usage: wsi-fl {command or ''}".rstrip())


def test_config_modules_import_only_the_standard_library():
    run = _fresh(f"""
import json, sys
before = set(sys.modules)
for name in {CONFIG_MODULES!r}:
    __import__(name)
print(json.dumps(sorted(set(sys.modules) - before)))
""")
    assert run.returncode == 0, run.stderr
    tops = {name.partition(".")[0] for name in json.loads(run.stdout)}
    third_party = sorted(t for t in tops if t not in sys.stdlib_module_names and t not in PROJECT_PACKAGES)
    assert not third_party, third_party
    assert {"wsi_fl", "models", "preprocessing"} <= tops  # the check above did look at the project's modules


def _parse(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(list(argv))


def test_cli_defaults_are_the_dataclasses_defaults():
    """Every default is written once, in its dataclass; the options only expose it."""
    train = _parse("train", "--out", "o")
    assert dataclass_from_args(SplitConfig, train) == SplitConfig()
    assert dataclass_from_args(TrainConfig, train) == TrainConfig()
    assert dataclass_from_args(MILConfig, train, in_dim=1024, n_classes=2) == MILConfig()
    evaluate = _parse("evaluate", "--model", "m", "--features", "f", "--labels", "l", "--out", "o")
    assert dataclass_from_args(EvalOptions, evaluate, exclude=("top_tiles",), heatmap_slides=()) == EvalOptions()
    assert evaluate.label_col is None and evaluate.split is None  # the model's own column; its test split
    bench = _parse("mil-benchmark", "--csv", "x.csv")
    assert dataclass_from_args(BenchmarkConfig, bench, exclude=("val_frac", "train", "threads", "mil")) \
        == BenchmarkConfig()
    # the options keep their names (scripts and docs use them): --bootstrap is EvalOptions.n_bootstrap
    assert _parse("evaluate", "--model", "m", "--features", "f", "--labels", "l", "--out", "o",
                  "--bootstrap", "7").n_bootstrap == 7


def _command(func) -> argparse.Namespace:
    return argparse.Namespace(command="probe", func=func)


def _raise(err: BaseException):
    def func(args: argparse.Namespace) -> int:
        raise err

    return func


@pytest.mark.parametrize("err", [ConfigError("bad value:\n  see   the docs"),
                                 *(cls("bad value: see the docs") for cls in PROJECT_ERRORS)])
def test_a_project_error_is_one_line_and_exit_code_2(err, capsys):
    assert dispatch(_command(_raise(err))) == 2
    captured = capsys.readouterr()
    assert captured.err == "wsi-fl probe: error: bad value: see the docs\n" and captured.out == ""


def test_an_unexpected_error_is_not_swallowed(capsys):
    """A ValueError that is no project error is a bug: it keeps its traceback, even though it is a ValueError."""
    with pytest.raises(ValueError, match="numpy said no"):
        dispatch(_command(_raise(ValueError("numpy said no"))))
    assert capsys.readouterr().err == ""
    assert dispatch(_command(lambda args: 0)) == 0


def test_project_errors_stay_value_errors_where_they_were():
    """Existing ``except ValueError`` callers (and tests) keep working: the new bases were added, not swapped."""
    from models.checkpoint import CheckpointError, ProvenanceError
    from preprocessing.encoders import EncoderError
    from preprocessing.errors import InputError, PreprocessingError, SlideError
    from preprocessing.h5format import FeatureFileError
    from wsi_fl._registry import UnknownNameError
    from wsi_fl.cli._common import UsageError
    from wsi_fl.mil.data import BagDataError
    from wsi_fl.server.loop import FederationError
    from wsi_fl.site.data import SiteConfigError
    from wsi_fl.site.policy import PolicyError

    for cls in (ConfigError, CheckpointError, ProvenanceError, BagDataError, SiteConfigError, PolicyError,
                UnknownNameError, InputError):
        assert issubclass(cls, ValueError), cls
    for cls in (ConfigError, CheckpointError, BagDataError, SiteConfigError, PolicyError, UnknownNameError,
                FederationError, UsageError):
        assert issubclass(cls, WsiFlError), cls
    assert issubclass(FederationError, RuntimeError) and issubclass(UnknownNameError, KeyError)
    for cls in (SlideError, EncoderError, FeatureFileError, InputError):
        assert issubclass(cls, PreprocessingError), cls


@pytest.mark.parametrize("argv, message", [
    (["mil-benchmark", "--csv", "x.csv", "--folds", "1"], "folds >= 2"),
    (["train", "--out", "o", "--val-frac", "0.6", "--test-frac", "0.5"], "val_frac + test_frac < 1"),
    (["preprocess", "--slides", "s", "--out", "o", "--target-mpp", "-1"], "target_mpp must be > 0"),
    (["evaluate", "--model", "m", "--features", "f", "--labels", "l", "--out", "o", "--threshold", "2"],
     "in [0, 1]"),
])
def test_bad_settings_fail_in_one_line_before_anything_heavy(argv, message):
    """The real command in a real process: exit code 2, one line on stderr, no traceback, and no torch loaded."""
    run = _fresh(f"""
import sys
from wsi_fl.cli.main import main
code = main({argv!r})
print(code, sorted(m for m in {HEAVY!r} if m in sys.modules))
""")
    assert run.stdout.strip() == "2 []", run.stdout + run.stderr
    assert run.stderr.startswith(f"wsi-fl {argv[0]}: error: ") and message in run.stderr, run.stderr
    assert run.stderr.count("\n") == 1 and "Traceback" not in run.stderr


def test_dataclass_options_follow_a_renamed_option():
    """``metadata["option"]`` names the flag; the value still lands on the field's name."""

    @dataclasses.dataclass(frozen=True)
    class Probe:
        n_rounds: int = dataclasses.field(default=3, metadata={"option": "rounds", "help": "how many"})

    from wsi_fl.cli._args import add_dataclass_args

    parser = argparse.ArgumentParser()
    add_dataclass_args(parser, Probe)
    assert dataclass_from_args(Probe, parser.parse_args(["--rounds", "5"])) == Probe(n_rounds=5)
    assert "--rounds ROUNDS" in parser.format_help() and "(default: 3)" in parser.format_help()
