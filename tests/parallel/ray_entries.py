"""Per-rank entries for the Ray driver tests: small module-level functions (picklable by reference).

Each initialises torch.distributed (gloo) from the environment the driver set, like the real entry.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist

from compressor.errors import ConfigError
from compressor.utils.fs import atomic_write_json

ENV_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "OMP_NUM_THREADS",
            "COMPRESSOR_TEST_VAR")


def report_environment() -> Optional[dict[str, Any]]:
    """All ranks' torch.distributed variables and the sum of (rank + 1) over the group, on rank 0."""
    dist.init_process_group("gloo")
    try:
        value = torch.tensor([float(dist.get_rank() + 1)])
        dist.all_reduce(value)
        env = {k: os.environ.get(k) for k in ENV_KEYS}
        env.update(pid=os.getpid(), threads=torch.get_num_threads())
        envs: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(envs, env)
        return {"sum": value.item(), "envs": envs} if dist.get_rank() == 0 else None
    finally:
        dist.destroy_process_group()


def count_steps(workdir: str, steps: int, crash_rank: int = -1, crash_step: int = -1,
                crashes: int = 0) -> Optional[dict[str, Any]]:
    """A resumable "training run": step s adds sum over ranks of (rank + 1) * (s + 1) to a total.

    Rank 0 checkpoints (step, total) after every step; every rank resumes from it, as the real entry
    resumes from its checkpoint. Rank ``crash_rank`` SIGKILLs its own process after step ``crash_step``
    on its first ``crashes`` attempts (counted in marker files), so restarts can be tested.
    """
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    work = Path(workdir)
    ckpt = work / "checkpoint.json"
    state = json.loads(ckpt.read_text()) if ckpt.exists() else {"step": 0, "total": 0.0}
    if rank == 0:
        with open(work / "starts.txt", "a") as fh:
            fh.write(f"{state['step']}\n")
    dist.barrier()  # nobody crashes before rank 0 has noted where this attempt started
    for step in range(state["step"], steps):
        value = torch.tensor([float((rank + 1) * (step + 1))])
        dist.all_reduce(value)
        state = {"step": step + 1, "total": state["total"] + value.item()}
        if rank == 0:
            atomic_write_json(ckpt, state)
        if rank == crash_rank and step == crash_step and _take_crash(work, crashes):
            os.kill(os.getpid(), signal.SIGKILL)
    dist.barrier()
    dist.destroy_process_group()
    return state if rank == 0 else None


def _take_crash(work: Path, crashes: int) -> bool:
    done = len(list(work.glob("crash-*")))
    if done >= crashes:
        return False
    (work / f"crash-{done}").touch()
    return True


def fail_on_rank(workdir: str, rank_to_fail: int, error: str) -> None:
    """Rank ``rank_to_fail`` raises (RuntimeError or ConfigError) on every attempt; attempts are counted."""
    rank = int(os.environ["RANK"])
    if rank == rank_to_fail:
        with open(Path(workdir) / "attempts.txt", "a") as fh:
            fh.write("x\n")
        if error == "config":
            raise ConfigError("train.steps must be positive (a user error: retrying would not help)")
        raise RuntimeError(f"rank {rank} broke on purpose")
    return None


def train_rank_killed_once(cfg, output: str, *, kill_rank: int, after_step: int, marker: str):
    """The real megatron ``train_rank``; on its first attempt rank ``kill_rank`` SIGKILLs its own process as
    soon as the checkpoint of ``after_step`` exists (mid-run: the next steps are already under way).
    Rank 0 notes in ``marker.starts`` which checkpoint each attempt found."""
    import threading
    import time

    from compressor.parallel.megatron_checkpoint import latest_checkpoint, step_name
    from compressor.parallel.megatron_train import CHECKPOINTS, train_rank

    if int(os.environ["RANK"]) == 0:  # where each attempt starts from, for the test to check
        found = latest_checkpoint(Path(output) / CHECKPOINTS)
        with open(f"{marker}.starts", "a") as fh:
            fh.write(f"{found.name if found else 'none'}\n")
    if int(os.environ["RANK"]) == kill_rank and not Path(marker).exists():
        checkpoint = Path(output) / "checkpoints" / step_name(after_step)

        def kill_when_checkpointed() -> None:
            while not checkpoint.exists():
                time.sleep(0.02)
            Path(marker).touch()
            os.kill(os.getpid(), signal.SIGKILL)

        threading.Thread(target=kill_when_checkpointed, daemon=True).start()
    return train_rank(cfg, output)
