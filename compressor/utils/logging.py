"""Logging set-up: one rich handler on the package logger; modules call ``get_logger(__name__)``."""

from __future__ import annotations

import logging

_PACKAGE = "compressor"


def get_logger(name: str) -> logging.Logger:
    return logging.getLogger(name if name.startswith(_PACKAGE) else f"{_PACKAGE}.{name}")


def setup_logging(level: str | int = "INFO") -> None:
    logger = logging.getLogger(_PACKAGE)
    if logger.handlers:
        logger.setLevel(level)
        return
    try:
        from rich.console import Console
        from rich.logging import RichHandler

        # Logs go to stderr, so that stdout carries only results (e.g. `compressor eval` JSON).
        handler: logging.Handler = RichHandler(console=Console(stderr=True), show_path=False, rich_tracebacks=False)
        handler.setFormatter(logging.Formatter("%(message)s", datefmt="[%X]"))
    except ImportError:  # pragma: no cover - rich is a dependency
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
