"""Logging of the ``wsi_fl`` loggers in the processes Flower starts (ServerApp, ClientApp): nobody else sets it up."""

from __future__ import annotations

import logging
import os
import sys

#: The level of the ``wsi_fl`` loggers where :func:`configure_logging` is not given one, as a name (``WARNING``)
#: or a number; unset or unknown: INFO. An environment variable because the processes that log are started by
#: Flower or Ray, not by us: the simulation engine sets it to WARNING for its simulated sites (Ray workers
#: inherit it), so they report problems but not their start-up.
LOG_LEVEL_ENV = "WSI_FL_LOG_LEVEL"


def env_level() -> int:
    """The level :data:`LOG_LEVEL_ENV` names, else INFO."""
    value = os.environ.get(LOG_LEVEL_ENV, "").strip().upper()
    if value.isdigit():
        return int(value)
    level = logging.getLevelName(value) if value else logging.INFO
    return level if isinstance(level, int) else logging.INFO


def configure_logging(level: int | None = None) -> None:
    """``LEVEL wsi_fl.module: message`` on stderr, once per process (a second call only sets the level).

    ``level``: else :data:`LOG_LEVEL_ENV`'s, else INFO.
    """
    logger = logging.getLogger("wsi_fl")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(env_level() if level is None else level)
