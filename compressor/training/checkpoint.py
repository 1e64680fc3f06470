"""Training checkpoints that survive a kill at any moment.

A checkpoint is a folder ``step_<N>/`` with the trainable state (rank 0), one file of per-rank state
(optimizer partition, data position, RNG), and ``meta.json`` written last. ``latest`` names the newest
complete checkpoint and is replaced atomically only after every rank has finished writing, so a run
killed mid-save resumes from the previous checkpoint. Older checkpoints beyond ``keep`` are removed.
State is stored as safetensors plus JSON (``compressor.checkpoints.tree``): nothing is unpickled.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from compressor.checkpoints.tree import load_tree, save_tree, tree_exists
from compressor.errors import CheckpointError
from compressor.utils.fs import atomic_write_json, atomic_write_text, read_json
from compressor.utils.logging import get_logger

log = get_logger(__name__)
LATEST = "latest"
COMPLETE = "meta.json"


def rng_state() -> dict[str, Any]:
    """torch, Python and numpy global RNG states in plain types (numpy's key array as a tensor)."""
    import random

    import numpy as np

    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss))}


def set_rng_state(state: dict[str, Any]) -> None:
    import random

    import numpy as np

    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))


def step_dir(root: Path, step: int) -> Path:
    return root / f"step_{step:07d}"


def save_checkpoint(
    root: str | Path,
    step: int,
    rank: int,
    shared: Optional[dict[str, Any]],
    per_rank: dict[str, Any],
    barrier: Callable[[], None] = lambda: None,
    keep: int = 2,
    write_files: Optional[Callable[[Path], None]] = None,
) -> Path:
    """Every rank calls this; ``shared`` (rank 0 only) holds what all ranks have in common.
    ``write_files(folder)`` (every rank; it may gather collectively) adds files of its own before the
    checkpoint is marked complete."""
    root = Path(root)
    folder = step_dir(root, step)
    folder.mkdir(parents=True, exist_ok=True)
    save_tree(folder / f"rank{rank:05d}", per_rank)
    if rank == 0:
        save_tree(folder / "shared", shared)
    if write_files is not None:
        write_files(folder)
    barrier()
    if rank == 0:
        atomic_write_json(folder / COMPLETE, {"step": step})
        atomic_write_text(root / LATEST, folder.name)
        remove_old_checkpoints(root, keep, COMPLETE)
    barrier()
    return folder


def remove_old_checkpoints(root: Path, keep: int, complete_marker: str) -> None:
    """Keep the newest ``keep`` complete checkpoints (and whatever ``latest`` names)."""
    pointer = root / LATEST
    named = pointer.read_text().strip() if pointer.is_file() else None
    finished = sorted(p for p in root.glob("step_*") if (p / complete_marker).is_file())
    for old in finished[:-keep]:
        if old.name != named:
            shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(root: str | Path, complete_marker: str = COMPLETE) -> Optional[Path]:
    """The newest complete checkpoint (the one ``latest`` names), None before the first one.

    A ``latest`` that names an incomplete or missing folder (a damaged run folder) falls back to the
    newest complete checkpoint still there, with a warning, rather than losing it.
    """
    root = Path(root)
    pointer = root / LATEST
    if not pointer.is_file():
        return None
    folder = root / pointer.read_text().strip()
    if (folder / complete_marker).is_file():
        return folder
    complete = sorted(p for p in root.glob("step_*") if (p / complete_marker).is_file())
    if not complete:
        raise CheckpointError(f"{pointer} names {folder.name}, which is incomplete, and {root} holds no complete "
                              "checkpoint to resume from; start the run over in a new output folder")
    log.warning("%s names %s, which is incomplete; resuming from %s, the newest complete checkpoint",
                pointer, folder.name, complete[-1].name)
    return complete[-1]


def load_checkpoint(folder: Path, rank: int) -> tuple[int, dict[str, Any], dict[str, Any]]:
    """(step, shared, per_rank) of a complete checkpoint folder."""
    step = read_json(folder / COMPLETE, CheckpointError)["step"]
    if (folder / "shared.pt").exists():
        raise CheckpointError(f"{folder} is in the pickle format of earlier versions, which is no longer read "
                              "(a pickle can run code); start the run over in a new output folder")
    if not tree_exists(folder / f"rank{rank:05d}"):
        raise CheckpointError(
            f"{folder} has no state for rank {rank}: it was saved with fewer ranks; resume with the same world size"
        )
    return step, load_tree(folder / "shared"), load_tree(folder / f"rank{rank:05d}")
