"""The one way a benchmark writes its results JSON: atomically, with the host it ran on (CPU model, the
SIMD width torch uses, the bf16 path, thread count, package versions, git commit), since a speed figure
only compares with one from the same machine."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from compressor.utils.env import environment_info
from compressor.utils.fs import atomic_write_json


def write_results(path: str | Path, result: dict[str, Any]) -> Path:
    """Write ``result`` plus ``environment`` to ``path`` (parents created; the old file stays until the new
    one is complete)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, {**result, "environment": environment_info()})
    return path


def read_results(path: str | Path) -> dict[str, Any]:
    """An earlier results file, or {} when there is none (scripts that add one part at a time)."""
    path = Path(path)
    return json.loads(path.read_text()) if path.is_file() else {}
