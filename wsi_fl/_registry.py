"""One name -> factory registry, written once and used by models, encoders and strategies (timm's ``_registry``).

Standard library only, so a registry can be consulted (and a factory module
can register into it) without importing torch or Flower. Two rules every
registry of the project keeps: a name is registered once (a second
registration is a bug, usually a module imported under two names), and an
unknown name is answered with the list of known ones, so a typo on the command
line or in a run config is a one-line error that shows the fix.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from wsi_fl.errors import ConfigError

F = TypeVar("F", bound=Callable)


class UnknownNameError(ConfigError, KeyError):
    """A name no factory is registered under; ``str(err)`` lists the registered names.

    A ``ValueError`` as well as a ``KeyError``: for a caller the name is a bad value, for a mapping a missing key.
    """

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0])


class Registry(Generic[F]):
    """Factories by name. ``kind`` ("model", "encoder", "strategy") words the errors."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._factories: dict[str, F] = {}

    def register(self, name: str) -> Callable[[F], F]:
        """Decorator: ``@registry.register("name")`` over the factory; a name taken twice is refused."""

        def decorate(factory: F) -> F:
            if name in self._factories:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._factories[name] = factory
            return factory

        return decorate

    def names(self) -> list[str]:
        """The registered names, sorted."""
        return sorted(self._factories)

    def get(self, name: str) -> F:
        """The factory of ``name``; an unknown name raises :class:`UnknownNameError` listing the known ones."""
        try:
            return self._factories[name]
        except KeyError:
            raise UnknownNameError(f"unknown {self.kind} {name!r}; registered: {', '.join(self.names())}") from None

    def __contains__(self, name: object) -> bool:
        return name in self._factories

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._factories)
