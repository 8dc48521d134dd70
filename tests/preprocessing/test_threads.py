"""How many CPUs the tool uses: ``--threads``, else SLURM's allocation, else affinity and cgroup quota."""

from __future__ import annotations

import os

import pytest
import torch

from preprocessing.runtime import available_cores, configure_threads, use_threads
from wsi_fl.cli.main import build_parser

VISIBLE = len(os.sched_getaffinity(0))


def test_slurm_cpus_per_task_bounds_what_the_tool_uses(monkeypatch):
    monkeypatch.delenv("SLURM_CPUS_PER_TASK", raising=False)
    assert 1 <= available_cores() <= VISIBLE  # affinity (and any cgroup quota)
    assert available_cores({"SLURM_CPUS_PER_TASK": "1"}) == 1
    assert available_cores({"SLURM_CPUS_PER_TASK": str(VISIBLE + 8)}) == available_cores({})  # never past affinity
    assert available_cores({"SLURM_CPUS_PER_TASK": "lots"}) == available_cores({})
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "1")  # what a task started by sbatch --cpus-per-task=1 sees
    before = torch.get_num_threads()
    try:
        assert configure_threads(0) == torch.get_num_threads() == 1  # the extraction's own sizing
    finally:
        torch.set_num_threads(before)


def test_threads_option_sizes_torch_and_the_tool_and_is_undone(monkeypatch):
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "1")
    before = torch.get_num_threads()
    with use_threads(3) as n:  # --threads wins over SLURM's value (the user asked)
        assert n == 3 and available_cores() == 3 and torch.get_num_threads() == 3
        assert configure_threads(0) == 3
    assert torch.get_num_threads() == before and available_cores() == 1
    with use_threads(None) as n:  # no --threads: the default sizing
        assert n == 1 == torch.get_num_threads()
    with pytest.raises(ValueError, match="--threads must be >= 1"), use_threads(0):
        pass


@pytest.mark.parametrize("command", [["preprocess", "--slides", "s", "--out", "o"], ["train", "--out", "o"],
                                     ["evaluate", "--model", "m", "--features", "f", "--labels", "l", "--out", "o"]])
def test_preprocess_train_and_evaluate_take_threads(command, capsys):
    parser = build_parser()
    assert parser.parse_args([*command, "--threads", "4"]).threads == 4
    assert parser.parse_args(command).threads is None
    with pytest.raises(SystemExit):
        parser.parse_args([*command, "--threads", "0"])
    assert "must be at least 1" in capsys.readouterr().err
