"""The project's exception base, so the CLI can tell a user's mistake from a bug.

``wsi-fl`` turns a :class:`WsiFlError` into a one-line message and exit code 2;
anything else (a ``ValueError`` deep in numpy, a ``KeyError``) is a bug and keeps
its traceback. Classes here import nothing, so any module may raise them.
"""

from __future__ import annotations


class WsiFlError(Exception):
    """Base of every error the project raises on purpose about its inputs or settings."""


class ConfigError(WsiFlError, ValueError):
    """A setting or input is invalid, found before any work starts.

    Also a ``ValueError`` because that is what configuration validation raised
    before this class existed, and callers (and tests) catch it as such.
    """
