"""Training checkpoints that survive a kill at any moment.

A checkpoint is a folder ``step_<N>/`` with the trainable state (rank 0), one file of per-rank state
(optimizer partition, data position, RNG), and ``meta.json`` written last. ``latest`` names the newest
complete checkpoint and is replaced atomically only after every rank has finished writing, so a run
killed mid-save resumes from the previous checkpoint. Older checkpoints beyond ``keep`` are removed.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from compressor.errors import CheckpointError
from compressor.utils.fs import atomic_torch_save, atomic_write_json, atomic_write_text

LATEST = "latest"


def rng_state() -> dict[str, Any]:
    import random

    import numpy as np

    return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}


def set_rng_state(state: dict[str, Any]) -> None:
    import random

    import numpy as np

    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])


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
) -> Path:
    """Every rank calls this; ``shared`` (rank 0 only) holds what all ranks have in common."""
    root = Path(root)
    folder = step_dir(root, step)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_torch_save(per_rank, folder / f"rank{rank:05d}.pt")
    if rank == 0:
        atomic_torch_save(shared, folder / "shared.pt")
    barrier()
    if rank == 0:
        atomic_write_json(folder / "meta.json", {"step": step})
        atomic_write_text(root / LATEST, folder.name)
        finished = sorted(p for p in root.glob("step_*") if (p / "meta.json").exists())
        for old in finished[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return folder


def latest_checkpoint(root: str | Path, complete_marker: str = "meta.json") -> Optional[Path]:
    """The folder the ``latest`` pointer names, None before the first checkpoint; an error if the
    folder lacks ``complete_marker`` (the file a checkpoint writes last)."""
    root = Path(root)
    pointer = root / LATEST
    if not pointer.is_file():
        return None
    folder = root / pointer.read_text().strip()
    if not (folder / complete_marker).is_file():
        raise CheckpointError(f"{pointer} names {folder.name}, which is incomplete; delete {pointer} to start over")
    return folder


def load_checkpoint(folder: Path, rank: int) -> tuple[int, dict[str, Any], dict[str, Any]]:
    """(step, shared, per_rank) of a complete checkpoint folder."""
    step = json.loads((folder / "meta.json").read_text())["step"]
    rank_file = folder / f"rank{rank:05d}.pt"
    if not rank_file.is_file():
        raise CheckpointError(
            f"{folder} has no state for rank {rank}: it was saved with fewer ranks; resume with the same world size"
        )
    try:
        shared = torch.load(folder / "shared.pt", weights_only=False)
        per_rank = torch.load(rank_file, weights_only=False)
    except Exception as exc:
        raise CheckpointError(f"cannot read checkpoint {folder}: {exc}") from exc
    return step, shared, per_rank
