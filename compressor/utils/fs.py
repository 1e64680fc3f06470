"""Atomic writes: everything lands under a temporary name in the same folder, then is renamed.

A crash therefore leaves either the old file or the new one, never half of one; which folders a
command may write into is decided in ``compressor.utils.run_folder``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from compressor.errors import CompressorError, OutputExistsError, OutputWriteError


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


def io_reason(exc: BaseException) -> str:
    """The cause of a failed read or write in a few words ("No space left on device")."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    # safetensors' Rust errors read like: IoError(Os { code: 28, kind: StorageFull, message: "No space ..." })
    found = re.search(r'message: "([^"]+)"', str(exc))
    return found.group(1) if found else f"{type(exc).__name__}: {exc}"


def describe_os_error(exc: OSError) -> str:
    """One line naming the file and the cause of a failed file operation."""
    files = " -> ".join(str(f) for f in (exc.filename, exc.filename2) if f)
    return f"{files}: {io_reason(exc)}" if files else io_reason(exc)


def _is_write_failure(exc: BaseException) -> bool:
    return isinstance(exc, OSError) or type(exc).__name__ == "SafetensorError"


@contextmanager
def write_failures_named(path: Path) -> Iterator[None]:
    """Turn a failed write inside the block (no space, no permission, a read-only folder, a file-size
    limit) into an OutputWriteError that names ``path`` and the cause in one line."""
    try:
        yield
    except OutputWriteError:
        raise
    except Exception as exc:
        if _is_write_failure(exc):
            raise OutputWriteError(f"cannot write {path}: {io_reason(exc)} (nothing was replaced; fix the cause "
                                   "and run again, with --resume where the command has it)") from exc
        raise


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` if the block succeeds.

    A failed write is an OutputWriteError naming ``path``; the temporary file is removed and ``path``
    keeps its old content, so the run that wrote it can be resumed once the cause is fixed.
    """
    path = Path(path)
    tmp: Path | None = None
    try:
        with write_failures_named(path):
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            os.close(fd)
            tmp = Path(tmp_name)
            yield tmp
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp, path)
            _fsync_dir(path.parent)
    finally:
        if tmp is not None and tmp.exists():
            tmp.unlink()


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def read_json(path: str | Path, error: type[CompressorError] = CompressorError) -> Any:
    """Parse a JSON file; a missing, unreadable or malformed one is ``error`` naming the file."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise error(f"{path} is missing") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise error(f"cannot read {path}: {io_reason(exc)}") from exc
    try:
        return json.loads(text)
    except ValueError as exc:
        raise error(f"{path} is not valid JSON ({exc}); it is damaged or was not written for this purpose") from None


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
    tmp: Path | None = None
    try:
        with write_failures_named(path):
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
            yield tmp
            move_dir_into_place(tmp, path, replace)
    finally:
        if tmp is not None and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
