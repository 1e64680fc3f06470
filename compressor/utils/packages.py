"""Find files that ship inside installed packages, without importing them (some ``__init__`` files
import tools we do not install)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Optional


def package_dir(module: str) -> Optional[Path]:
    """The folder of an installed top-level package, or None; the package is not imported."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])
