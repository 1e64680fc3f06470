"""Atomic writes: everything lands under a temporary name in the same folder, then is renamed.

A crash therefore leaves either the old file or the new one, never half of one; folders that
hold a finished result are marked by a file written last (see ``prepare_output_dir``).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from compressor.errors import OutputExistsError


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def atomic_save_safetensors(tensors: dict, path: str | Path, metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)


def move_dir_into_place(src: Path, path: Path, replace: bool = False) -> None:
    """Rename the finished folder ``src`` to ``path``; an existing ``path`` is swapped out only if asked."""
    if path.exists():
        if not replace:
            raise OutputExistsError(f"{path} already exists; remove it or choose another path")
        trash = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
        os.replace(path, trash / path.name)
        os.replace(src, path)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(src, path)
    _fsync_dir(path.parent)


@contextmanager
def atomic_dir(path: str | Path, replace: bool = False) -> Iterator[Path]:
    """Build a folder under a temporary name and rename it to ``path`` when the block succeeds."""
    path = Path(path)
    if path.exists() and not replace:
        raise OutputExistsError(f"{path} already exists; remove it or choose another path")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        move_dir_into_place(tmp, path, replace)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


DONE_MARKER = "report.json"


def prepare_output_dir(path: str | Path, overwrite: bool = False, resume: bool = False) -> Path:
    """Create or reuse a run's output folder, never destroying results unless asked to.

    A finished run is marked by ``report.json`` (written last). An unfinished one can be resumed.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputExistsError(f"output {path} is a file, not a folder; choose another --output")
    if path.is_dir() and any(path.iterdir()):
        finished = (path / DONE_MARKER).exists()
        if overwrite:
            shutil.rmtree(path)
        elif resume and not finished:
            return path
        elif finished:
            raise OutputExistsError(
                f"output folder {path} already holds a finished run; pass --overwrite to replace it "
                "or choose another --output"
            )
        else:
            raise OutputExistsError(
                f"output folder {path} holds an unfinished run; pass --resume to continue it, "
                "--overwrite to start over, or choose another --output"
            )
    path.mkdir(parents=True, exist_ok=True)
    return path
