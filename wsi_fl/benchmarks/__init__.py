"""Reusable benchmark protocols; ``scripts/bench_*.py`` are thin drivers over them.

Kept in the package (not in the scripts) so tests import them like any other module and a protocol's code is the
code its results were produced with.
"""

from wsi_fl._lazy import lazy_exports

_EXPORTS = {
    "BenchmarkConfig": "mil_config",
    "run_mil_benchmark": "mil",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
