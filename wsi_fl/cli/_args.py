"""Expose a config dataclass's fields as command-line options, so the CLI never duplicates defaults.

Each field becomes ``--<prefix><field-name>`` (or ``--<prefix><metadata["option"]>``
where the option's name predates the field's) with the field's type and
default; its help text is the field's ``metadata["help"]`` when present.
Adding a parameter to a dataclass is then all it takes to make it settable.
Standard library only: subcommands call it while building ``--help``.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any, TypeVar

T = TypeVar("T")


def _scalar_type(tp: Any) -> Any:
    """``float | None`` -> float; ``Literal['a','b']`` -> str; plain types pass through."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _scalar_type(args[0])
    if origin is typing.Literal:
        return type(typing.get_args(tp)[0])
    return tp


def _choices(tp: Any) -> tuple[Any, ...] | None:
    """The allowed values of a ``Literal`` (possibly inside ``X | None``), else ``None``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return _choices(next(a for a in typing.get_args(tp) if a is not type(None)))
    return typing.get_args(tp) if origin is typing.Literal else None


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, not {text!r}")


def add_dataclass_args(group: argparse._ActionsContainer, cls: type, prefix: str = "",
                       exclude: tuple[str, ...] = ()) -> None:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in exclude:
            continue
        tp = _scalar_type(hints[f.name])
        if tp is bool:
            tp = _bool
        default = f.default if f.default is not dataclasses.MISSING else None
        help_text = f.metadata.get("help", "")
        option = f.metadata.get("option", f.name).replace("_", "-")
        group.add_argument(
            f"--{prefix}{option}", dest=f"{prefix.replace('-', '_')}{f.name}",
            type=tp, default=default, choices=_choices(hints[f.name]),
            metavar=None if _choices(hints[f.name]) else option.replace("-", "_").upper(),
            help=f"{help_text} (default: {default})".strip(),
        )


def dataclass_from_args(cls: type[T], args: argparse.Namespace, prefix: str = "", exclude: tuple[str, ...] = (),
                        **fixed: Any) -> T:
    """Build ``cls`` from the parsed options; ``fixed`` supplies fields that were excluded from the CLI,
    fields in ``exclude`` keep their defaults."""
    values = {f.name: getattr(args, f"{prefix.replace('-', '_')}{f.name}")
              for f in dataclasses.fields(cls) if f.name not in fixed and f.name not in exclude}
    return cls(**values, **fixed)
