"""Process-level settings that decide CPU feature-extraction speed: allocator, threads, workers, batch.

The allocator
-------------
CPU torch allocates each activation of a forward pass with ``malloc`` and frees
it right after. glibc serves every block above its mmap threshold (128 KiB,
raised dynamically only up to 32 MiB) with a fresh ``mmap`` and returns it with
``munmap``, and trims the heap top above 128 KiB: so each forward maps, zero-fills
(page faults) and unmaps hundreds of MB. A ResNet-50 trunk at batch 32 (layer1
activations alone are 103 MB) spends ~40 % of its time in the kernel.

Measured here (2 shared cores, glibc 2.36, torch 2.13 CPU, ``resnet50_trunc``,
batch 32, 2 threads; 4 forwards; other jobs ran beside it, so wall figures are
noisy, the system time is not)::

    setting                                              tiles/s   sys CPU s
    default                                                  9.9      13.5
    GLIBC_TUNABLES mmap_threshold=4 GiB:trim_threshold=16 GiB 18.7     1.0
    GLIBC_TUNABLES trim_threshold only                         8.1      16.6
    GLIBC_TUNABLES mmap_threshold only                        11.8       7.8
    mallopt M_MMAP_THRESHOLD=32 MiB + M_TRIM_THRESHOLD=2 GiB  11.4       8.3
    mallopt M_MMAP_THRESHOLD=2 GiB-1 + M_TRIM_THRESHOLD=2 GiB 18.8       0.7
    mallopt M_MMAP_MAX=0 + M_TRIM_THRESHOLD=2 GiB             19.2       0.8
    mallopt (threshold variant) applied *after* torch import
    and a first forward, same process                    10.3 -> 18.0  7.1 -> 0.0

Both settings are needed (no mmap for big blocks, and no trimming). A 32 MiB
mmap cap (the limit of older glibc's ``mallopt``) is not enough; but glibc 2.36
accepts a 2 GiB threshold through ``mallopt``, and ``M_MMAP_MAX=0`` (accepted by
every glibc) works as well. ``mallopt`` takes effect at once, in the running
process, so the simplest mechanism that really works is a few ``ctypes`` calls:
no restart, and it also helps callers that use the library from their own
Python (notebooks, :func:`.extract.extract_features` calls it itself).

:func:`ensure_fast_allocator` therefore tunes ``malloc`` in place and exports
``GLIBC_TUNABLES`` so child processes start tuned; only where ``mallopt``
is unavailable or refused does it fall back to re-executing the process with
``GLIBC_TUNABLES`` set (tunables are read at process start only). The cost is
memory held, not returned: the heap keeps its peak (a few hundred MB for a batch
of 32), which the next batch reuses.

Threads, workers, batch
-----------------------
Reading and decoding a 224 px tile costs ~2 ms of one core (~0.5 ms of it the
RGBA -> RGB conversion), ~2 % of the core time of a ResNet-50 trunk forward and
~6 % of a ResNet-18 trunk's. Where to spend it, on CPU:

* *A worker process beside a full set of torch threads* (oversubscribed): each
  time the worker runs it stalls one OpenMP thread, and the whole parallel
  region waits for that straggler, so it costs ~2-3x its own CPU time.
  Measured, 2 cores, ``resnet50_trunc``, 128 tiles, medians of 4 interleaved runs
  (tiles/s): forward only 22.4; 1 worker + 2 threads 19.6 (0.88); the worker
  at nice 19 or SCHED_IDLE 18.9 / 18.2; reading inline 22.1 (0.99).
* *A worker with a core of its own*: costs 1/cores of the model's threads.
* *Inline*, in the main process between forwards, on as many threads as the
  model has (OpenSlide decodes without the GIL: 2 threads read ~1.9x faster
  when the cores are free): costs the reading time over the cores, ~1 ms a
  tile here. ``scripts/bench_extract.py``, 256 tiles, best of 2 (tiles/s,
  forward-only -> end to end): ``resnet50_trunc`` 23.6 -> 24.2 (1.02, noise),
  ``resnet18_trunc`` 60.6 -> 56.6 (0.93: reading is a larger share of a
  cheaper model).

So below 8 cores tiles are read inline (``num_workers=0``). From 8 cores up,
where the GIL-bound part of reading would no longer keep pace, one worker per
16 cores reads on a core of its own (a rule from the figures above, not yet
measured on such a machine). On CUDA the model outruns any reader: all cores
but one read, and the main process only feeds the GPU.

Vision transformers on CPU
--------------------------
A ViT forward is GEMM-bound: profiled (ViT-S/16, batch 32) 75 % ``addmm``
(MKL sgemm), 12 % SDPA, 13 % copies/GELU/adds/LayerNorm. At 15 tiles/s ViT-S
runs at ~140 GFLOP/s, what MKL's sgemm reaches on these shapes with 2 threads
here (116-160; oneDNN's 113-137): the compute has little left to give, and the
tool keeps fp32, MKL, timm's fused SDPA and batch 32. Measured (2 shared Zen 3
cores, AVX2, no bf16; tiles/s, medians of interleaved runs in one process)::

    ViT-S/16 batch 32, tuned malloc                       13.7  (1.00)
    ... default glibc thresholds (sys 1.7 s / 64 tiles)   11.1  (0.82)
    ... torch.compile (inductor), alone / with freezing   15.2 vs 15.3 / 12.5 vs 13.7
    attention, 32x6x197x64: SDPA flash 81 ms, math 200 ms, matmul+softmax 122 ms
    batch 8 / 32 / 64 (quiet machine): flat within noise; with other jobs
    running, small batches lose most (4: 1.4, 64: 4.2), so 32 stays.

So no ``torch.compile`` (42-56 s cold compile, nothing gained), and the tool's
forward is only the allocator ahead of a naive ``model(batch)`` loop in a fresh
process (whose glibc raises its mmap threshold to 32 MiB after the first
frees, so only the MLP activations keep being mapped): ``scripts/bench_encoders.py``
measured 0.98-1.09x for ViT-S and ViT-B on a quiet machine (1.1-1.4x while other
jobs ran: the naive loop's page faults suffer most). Extraction ÷ forward was
0.92-1.01 (run-to-run spread ±10 % here); reading inline (~430-650 tiles/s)
bounds it at 0.986 for ViT-S, higher for larger models. ViT-L/16: ~1.1 tiles/s.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import math
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:  # torch is imported inside functions: ensure_fast_allocator must run before it loads
    import torch

    from .encoders import Encoder

__all__ = [
    "FAST_TUNABLES",
    "auto_batch_size",
    "auto_num_workers",
    "available_cores",
    "configure_threads",
    "ensure_fast_allocator",
    "fast_allocator_active",
    "merge_tunables",
    "pick_device",
    "tune_malloc",
    "use_threads",
]

TUNABLES_ENV = "GLIBC_TUNABLES"
NO_REEXEC_ENV = "WSI_FL_NO_REEXEC"
#: glibc tunables for torch on CPU: no mmap below 4 GiB, no heap trimming below 16 GiB.
FAST_TUNABLES = {
    "glibc.malloc.mmap_threshold": "4294967296",
    "glibc.malloc.trim_threshold": "17179869184",
}
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_MMAP_MAX = -4
_INT_MAX = 2**31 - 1  # mallopt takes an int
_malloc_tuned = False


# -- allocator ---------------------------------------------------------------------


def _parse_tunables(value: str | None) -> dict[str, str]:
    pairs = (item.split("=", 1) for item in (value or "").split(":") if "=" in item)
    return {k: v for k, v in pairs}


def merge_tunables(value: str | None) -> str:
    """``GLIBC_TUNABLES`` with :data:`FAST_TUNABLES` added; settings already there are kept."""
    merged = {**FAST_TUNABLES, **_parse_tunables(value)}
    return ":".join(f"{k}={v}" for k, v in merged.items())


def _env_is_fast(env: dict[str, str] | os._Environ[str]) -> bool:
    return FAST_TUNABLES.keys() <= _parse_tunables(env.get(TUNABLES_ENV)).keys()


def _glibc() -> ctypes.CDLL | None:
    """The running glibc, or None (musl, macOS, Windows)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018  (raises AttributeError outside glibc)
    except (OSError, AttributeError):
        return None
    return libc


def tune_malloc() -> bool:
    """Apply the allocator settings to this process with ``mallopt``; True if glibc accepted them.

    Tries a 2 GiB mmap threshold first (mirrors the tunable: giant one-off
    arrays are still returned to the OS); older glibc refuses thresholds above
    32 MiB, and then mmap is switched off instead (``M_MMAP_MAX=0``).
    """
    global _malloc_tuned
    if _malloc_tuned:
        return True
    libc = _glibc()
    if libc is None:
        return False
    if not libc.mallopt(_M_TRIM_THRESHOLD, _INT_MAX):
        return False
    if not (libc.mallopt(_M_MMAP_THRESHOLD, _INT_MAX) or libc.mallopt(_M_MMAP_MAX, 0)):
        return False
    _malloc_tuned = True
    return True


def fast_allocator_active() -> bool:
    """Whether this process runs with the fast allocator settings (from start-up or from ``mallopt``)."""
    return _malloc_tuned or (_glibc() is not None and _env_is_fast(os.environ))


def ensure_fast_allocator(argv: Sequence[str] | None = None,
                          *, method: Literal["auto", "reexec"] = "auto") -> None:
    """Make this process's ``malloc`` fast for torch; call first thing in ``main()``.

    ``auto``: nothing if the process started with the tunables; else tune in
    place with ``mallopt`` and export ``GLIBC_TUNABLES`` for child processes; if
    ``mallopt`` is refused, re-exec. ``reexec``: always use the tunables, re-executing
    ``sys.executable`` with ``argv`` (default: this process's own arguments, from
    ``sys.orig_argv``) unless ``WSI_FL_NO_REEXEC`` is set. Does not return when it
    re-executes. A no-op outside glibc.
    """
    if _glibc() is None or _env_is_fast(os.environ):
        return
    if method == "auto" and tune_malloc():
        os.environ[TUNABLES_ENV] = merge_tunables(os.environ.get(TUNABLES_ENV))
        return
    if os.environ.get(NO_REEXEC_ENV) or hasattr(sys, "ps1"):  # asked not to, or an interactive session
        return
    args = list(sys.orig_argv[1:] if argv is None else argv)
    os.environ[TUNABLES_ENV] = merge_tunables(os.environ.get(TUNABLES_ENV))
    os.environ[NO_REEXEC_ENV] = "1"  # belt and braces: never loop, even where glibc ignores the tunables
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, *args])


# -- cores, threads, workers, batch, device ------------------------------------------


def _cgroup_cpu_limit() -> float | None:
    """CPUs allowed by a cgroup quota (containers, Kubernetes), or None when unlimited."""
    candidates = [(Path("/sys/fs/cgroup/cpu.max"), None),
                  (Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us"), Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us"))]
    for quota_file, period_file in candidates:
        try:
            if period_file is None:
                quota, period = quota_file.read_text().split()[:2]
            else:
                quota, period = quota_file.read_text().strip(), period_file.read_text().strip()
        except (OSError, ValueError):
            continue
        if quota in ("max", "-1"):
            return None
        try:
            return max(int(quota) / int(period), 1.0)
        except (ValueError, ZeroDivisionError):
            return None
    return None


def _visible_cores() -> int:
    """Cores the kernel lets this process use: its CPU affinity, capped by a cgroup CPU quota."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    limit = _cgroup_cpu_limit()
    if limit is not None:
        cores = min(cores, math.ceil(limit))
    return max(cores, 1)


_threads_override: int | None = None  # --threads, for the duration of use_threads()


def available_cores(environ: Mapping[str, str] = os.environ) -> int:
    """CPUs this process should use: ``--threads`` (:func:`use_threads`), else SLURM's ``SLURM_CPUS_PER_TASK``
    (capped by what the kernel allows), else its CPU affinity capped by a cgroup CPU quota.

    SLURM without its task/affinity or task/cgroup plugin lets a task see every CPU of the node; the
    allocation is then only in ``SLURM_CPUS_PER_TASK``, and tasks sharing a node would oversubscribe it.
    """
    if _threads_override is not None:
        return _threads_override
    visible = _visible_cores()
    slurm = environ.get("SLURM_CPUS_PER_TASK", "").strip()
    if slurm.isdigit() and int(slurm) >= 1:
        return min(int(slurm), visible)
    return visible


@contextlib.contextmanager
def use_threads(threads: int | None) -> Iterator[int]:
    """Within the block, size everything to ``threads`` CPUs (``--threads``; None: :func:`available_cores`):
    the tool's own sizing (:func:`available_cores`) and torch's intra-op threads; both restored afterwards."""
    import torch

    global _threads_override
    if threads is not None and threads < 1:
        raise ValueError(f"--threads must be >= 1, not {threads}")
    previous, previous_torch = _threads_override, torch.get_num_threads()
    _threads_override = threads
    try:
        n = available_cores()
        torch.set_num_threads(n)
        yield n
    finally:
        _threads_override = previous
        torch.set_num_threads(previous_torch)


#: Below this many cores, CPU extraction reads tiles inline (see the module docstring).
MIN_CORES_FOR_CPU_WORKERS = 8


def auto_num_workers(device: str | torch.device = "cpu") -> int:
    """Tile-reading worker processes for ``device`` (0: read in the main process).

    CPU: none below 8 cores, then one per 16 cores, each on a core of its own.
    CUDA: all cores but one (at most 16).
    """
    import torch

    cores = available_cores()
    if torch.device(device).type == "cuda":
        return max(1, min(cores - 1, 16))
    return 0 if cores < MIN_CORES_FOR_CPU_WORKERS else math.ceil(cores / 16)


def configure_threads(num_workers: int, device: str | torch.device = "cpu") -> int:
    """Set and return torch's intra-op threads for this process, given the reader workers.

    CPU: from 8 cores up each worker gets a core of its own; below, the model
    keeps every core even if workers were asked for (a worker's core would cost
    more than its stalls; see the module docstring). CUDA: the main process only
    feeds the GPU, so a few threads do.
    """
    import torch

    cores = available_cores()
    if torch.device(device).type == "cuda":
        threads = max(1, min(4, cores - num_workers))
    elif cores >= MIN_CORES_FOR_CPU_WORKERS:
        threads = max(1, cores - num_workers)
    else:
        threads = cores
    torch.set_num_threads(threads)
    return threads


def auto_batch_size(encoder: Encoder, device: str | torch.device = "cpu") -> int:
    """Tiles per forward.

    CPU: 32 at 224 px (throughput is flat above ~16; activations stay a few
    hundred MB), scaled by pixel count for other input sizes. CUDA: the largest
    power of two whose activations, measured by one probe forward, fit in half
    the free memory (at most 512).
    """
    import torch

    device = torch.device(device)
    side = max(encoder.input_size, 1)
    if device.type != "cuda":
        return int(min(64, max(4, 32 * (224 / side) ** 2)))
    probe = 8
    try:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        x = torch.zeros(probe, side, side, 3, dtype=torch.uint8, device=device)
        with torch.inference_mode():
            encoder.model(encoder.preprocess(x))
        torch.cuda.synchronize(device)
        per_tile = max((torch.cuda.max_memory_allocated(device) - before) / probe, 1.0)
        free, _total = torch.cuda.mem_get_info(device)
    except RuntimeError:
        return 64
    fit = int(0.5 * free / per_tile)
    return max(8, min(512, 2 ** int(math.log2(max(fit, 1)))))


def pick_device(name: str = "auto") -> torch.device:
    """``auto`` -> the first CUDA device if torch sees one, else CPU; ``cpu``, ``cuda``, ``cuda:N`` as given.

    Raises ValueError (one line) for a CUDA device this torch cannot use.
    """
    import torch

    name = (name or "auto").strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ValueError(f"unknown device {name!r}: use auto, cpu, cuda or cuda:N") from err
    if device.type == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
            raise ValueError(f"device {name!r}: torch sees no CUDA device (this torch is {build}); use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {name!r}: only {torch.cuda.device_count()} CUDA device(s) visible")
    elif device.type != "cpu":
        raise ValueError(f"device {name!r} is not supported: use auto, cpu, cuda or cuda:N")
    return device
