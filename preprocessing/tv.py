"""Import torchvision on machines where its compiled ops cannot load.

PyPI's torchvision 0.28.0 is a CUDA build. Beside a CPU-only torch its C++
extension fails to load, and ``import torchvision`` then dies with
``operator torchvision::nms does not exist``: torchvision registers fake
(meta) kernels for ``nms``/``qnms`` at import time, and that registration
needs the op *schema* that the extension would have defined.

We only need torchvision's pure-Python parts (model definitions, transforms),
so when, and only when, the plain import fails with that error we define the
two missing schemas ourselves and import again. Where the extension loads,
torchvision is imported untouched. Detection ops (``nms``, ``roi_align``...)
and image decode ops stay unavailable on such a machine; we decode with PIL.

Always import torchvision through :func:`import_torchvision`.
"""

from __future__ import annotations

import sys
from types import ModuleType

import torch

_MISSING_OP = "torchvision::nms"
_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)
_fragment: torch.library.Library | None = None  # kept alive: dropping it unregisters the schemas


def _forget_partial_import() -> None:
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]


def import_torchvision() -> ModuleType:
    """Return the ``torchvision`` module, working around a CPU/CUDA build mismatch."""
    global _fragment
    try:
        import torchvision
    except RuntimeError as err:
        if _MISSING_OP not in str(err):
            raise
        _forget_partial_import()
        if _fragment is None:
            _fragment = torch.library.Library("torchvision", "FRAGMENT")
            for schema in _SCHEMAS:
                _fragment.define(schema)
        import torchvision
    return torchvision


def has_compiled_ops() -> bool:
    """Whether torchvision's C++ extension loaded (False under the workaround)."""
    return bool(import_torchvision().extension._has_ops())
