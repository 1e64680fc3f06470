"""Logging set-up: one rich handler on the package logger; modules call ``get_logger(__name__)``."""

from __future__ import annotations

import logging
import sys

_PACKAGE = "compressor"


def get_logger(name: str) -> logging.Logger:
    return logging.getLogger(name if name.startswith(_PACKAGE) else f"{_PACKAGE}.{name}")


class _StderrHandler(logging.StreamHandler):
    """Plain lines to whatever ``sys.stderr`` is when a record is written (callers may swap it)."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


def setup_logging(level: str | int = "INFO") -> None:
    logger = logging.getLogger(_PACKAGE)
    if logger.handlers:
        logger.setLevel(level)
        return
    # Logs go to stderr, so that stdout carries only results (e.g. `compressor eval` JSON). A terminal
    # gets rich's columns; a pipe or log file one plain line per record (rich would wrap long messages).
    if sys.stderr.isatty():
        from rich.console import Console
        from rich.logging import RichHandler

        handler: logging.Handler = RichHandler(console=Console(stderr=True), show_path=False, rich_tracebacks=False)
        handler.setFormatter(logging.Formatter("%(message)s", datefmt="[%X]"))
    else:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S"))
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
