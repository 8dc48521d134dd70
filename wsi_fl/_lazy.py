"""Lazy public faces for subpackages (PEP 562): ``from wsi_fl.mil import Site`` imports ``wsi_fl.mil.fit`` on use.

Why not plain imports in each ``__init__.py``: importing a submodule runs its
package's ``__init__`` first, so an eager face would make ``wsi_fl.mil.config``
(standard library only, read by ``wsi-fl train --help``) import torch through
``wsi_fl.mil.training``. A lazy face keeps every config module cheap while the
package still shows, in ``__all__``, the handful of names a user should reach for.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def lazy_exports(package: str, exports: Mapping[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for ``package``: ``exports`` maps a public name to the submodule defining it.

    A name that is itself a submodule (``"central": "central"``) resolves to that module.
    """

    def __getattr__(name: str) -> Any:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        module = importlib.import_module(f"{package}.{exports[name]}")
        return module if exports[name] == name else getattr(module, name)

    def __dir__() -> list[str]:
        return sorted(exports)

    return __getattr__, __dir__
