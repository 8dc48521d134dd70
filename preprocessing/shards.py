"""Which share of a site's slides a job-array task preprocesses: ``--shard i/n`` or ``--shard auto``.

``auto`` reads the scheduler's variables, so a job-array script passes the same option to every task:
SLURM's ``SLURM_ARRAY_TASK_ID``/``_MIN``/``_STEP``/``_COUNT`` or a Kubernetes indexed Job's
``JOB_COMPLETION_INDEX`` (with the count in ``WSI_FL_SHARD_COUNT``, which the Job spec sets). A task that
cannot tell its shard refuses with a one-line error rather than guess: a wrong guess (a resubmitted task
taking itself for shard 0 of 1) would preprocess every slide again in one task.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from .errors import InputError


def _env_int(environ: Mapping[str, str], name: str, default: int | None = None) -> int:
    value = environ.get(name, "").strip()
    if not value and default is not None:
        return default
    try:
        return int(value)
    except ValueError:
        raise InputError(f"--shard auto: {name}={value!r} is not a whole number") from None


def _slurm_shard(environ: Mapping[str, str]) -> tuple[int, int]:
    """A SLURM array task's shard: i = (TASK_ID - TASK_MIN) / TASK_STEP of n = TASK_COUNT, so ``--array=0-7``,
    ``--array=1-8`` and ``--array=0-14:2`` all make shards 0..7 of 8. Resubmitting some tasks of an n-task array
    alone (``--array=3,5``) is a new array of 2: ``WSI_FL_SHARD_COUNT=n`` then makes each task id its shard."""
    task = _env_int(environ, "SLURM_ARRAY_TASK_ID")
    if environ.get("WSI_FL_SHARD_COUNT", "").strip():
        i, n = task, _env_int(environ, "WSI_FL_SHARD_COUNT")
        where = f"SLURM_ARRAY_TASK_ID {task} with WSI_FL_SHARD_COUNT={n}"
    else:
        first = _env_int(environ, "SLURM_ARRAY_TASK_MIN", 0)
        step = _env_int(environ, "SLURM_ARRAY_TASK_STEP", 1)
        n = _env_int(environ, "SLURM_ARRAY_TASK_COUNT")
        if step < 1 or (task - first) % step:
            raise InputError(f"--shard auto: SLURM array task {task} is not min {first} plus a multiple of step "
                             f"{step} (an uneven --array list?): set WSI_FL_SHARD_COUNT to the array's shard count")
        i = (task - first) // step
        where = f"SLURM array task {task} (min {first}, step {step}, count {n})"
        if n == 1 and task != 0:
            raise InputError(f"--shard auto: {where} is an array of one task: to redo one shard of an earlier "
                             "array, set WSI_FL_SHARD_COUNT to that array's number of tasks; for a single shard "
                             "of everything, use --shard 0/1")
    if not (n >= 1 and 0 <= i < n):
        raise InputError(f"--shard auto: {where} gives shard {i}/{n}, not 0 <= i < n")
    return i, n


def parse_shard(text: str, environ: Mapping[str, str] = os.environ) -> tuple[int, int]:
    """``"i/n"`` (0-based) -> (i, n); ``"auto"`` reads SLURM (:func:`_slurm_shard`) or Kubernetes
    indexed-Job variables (``JOB_COMPLETION_INDEX``, with the count in ``WSI_FL_SHARD_COUNT``)."""
    if text == "auto":
        if "SLURM_ARRAY_TASK_ID" in environ:
            return _slurm_shard(environ)
        if "JOB_COMPLETION_INDEX" in environ:  # Kubernetes indexed Job; count passed by the Job spec
            i, n = _env_int(environ, "JOB_COMPLETION_INDEX"), _env_int(environ, "WSI_FL_SHARD_COUNT")
            if not (n >= 1 and 0 <= i < n):
                raise InputError(f"--shard auto: JOB_COMPLETION_INDEX {i} is not below WSI_FL_SHARD_COUNT {n}")
            return i, n
        raise InputError("--shard auto: no SLURM_ARRAY_TASK_ID or JOB_COMPLETION_INDEX in the environment")
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError as err:
        raise InputError(f"--shard must look like i/n (e.g. 0/4), not {text!r}") from err
    if not (n >= 1 and 0 <= i < n):
        raise InputError(f"--shard {text}: need 0 <= i < n")
    return i, n
