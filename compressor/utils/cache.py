"""The one cache location of the project: converted models, assembled model files, the training corpus,
token ids. ``$COMPRESSOR_CACHE`` moves it (default ``~/.cache/compressor``)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    return Path(os.environ.get("COMPRESSOR_CACHE") or Path.home() / ".cache" / "compressor")
