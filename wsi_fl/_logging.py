"""Logging of the ``wsi_fl`` loggers in the processes Flower starts (ServerApp, ClientApp): nobody else sets it up."""

from __future__ import annotations

import logging
import sys


def configure_logging(level: int = logging.INFO) -> None:
    """``LEVEL wsi_fl.module: message`` on stderr, once per process (a second call only sets the level)."""
    logger = logging.getLogger("wsi_fl")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(level)
