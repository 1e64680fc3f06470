"""Distributed checkpoints of mask learning with megatron-core's ``dist_checkpointing``.

A checkpoint is a folder ``step_<N>/`` written by every rank at once:

- ``logits/<HF weight name>`` and ``optim/exp_avg/...``, ``optim/exp_avg_sq/...``: ShardedTensors with
  global HF shapes, so the folder reloads at another TP / PP layout (megatron reshards on load);
- ``data_stream``: each data-parallel rank's exact stream position (a ShardedObject per DP rank);
- ``rng``: each rank's mask-noise generators and torch / python / numpy RNG (restored only when the
  layout is unchanged: noise is drawn per shard, so another layout starts fresh generators);
- the common part (rank 0): step, history, layout, AdamW's step count and hyper-parameters.

It is written under a hidden temporary name and renamed when every rank has finished; ``latest``
(replaced atomically) then names it, and older checkpoints beyond ``keep`` are removed. A run
killed mid-save therefore resumes from the previous checkpoint.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist

from compressor.checkpoints.logits import DIST_PREFIX
from compressor.errors import CheckpointError
from compressor.parallel.megatron_convert import LlamaDims
from compressor.parallel.megatron_masks import MaskSet, join_pieces, sharded_tensors
from compressor.parallel.megatron_model import Layout
from compressor.training import checkpoint as training_checkpoint
from compressor.training.checkpoint import LATEST, rng_state, set_rng_state, step_dir
from compressor.utils.fs import atomic_write_text
from compressor.utils.logging import get_logger

log = get_logger(__name__)

LOGITS, EXP_AVG, EXP_AVG_SQ = DIST_PREFIX, "optim/exp_avg/", "optim/exp_avg_sq/"


def step_name(step: int) -> str:
    return step_dir(Path("."), step).name


def latest_checkpoint(root: str | Path) -> Optional[Path]:
    # megatron's dist_checkpointing writes metadata.json into a finished checkpoint folder
    return training_checkpoint.latest_checkpoint(root, complete_marker="metadata.json")


def _adam_state(optimizer: torch.optim.Optimizer, param: torch.Tensor) -> dict[str, torch.Tensor]:
    state = optimizer.state.get(param)
    if not state:
        raise CheckpointError("the optimizer has no state yet; checkpoint after the first step")
    return state


def _layout_dict(layout: Layout) -> dict[str, int]:
    # The common part must be the same on every rank: sizes only.
    return {"tp_size": layout.tp_size, "pp_size": layout.pp_size, "dp_size": layout.dp_size}


def save(root: str | Path, step: int, masks: MaskSet, optimizer: torch.optim.Optimizer, stream, dims: LlamaDims,
         layout: Layout, history: dict[str, Any], keep: int = 2) -> Path:
    """Every rank calls this (a collective); returns the finished checkpoint folder."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing import ShardedObject

    root = Path(root)
    final, tmp = root / step_name(step), root / f".{step_name(step)}.tmp"
    rank = dist.get_rank()
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    first = next(iter(masks.values())).mask.logits
    adam_step = float(_adam_state(optimizer, first)["step"])
    state: dict[str, Any] = {
        **sharded_tensors(masks, dims, layout, LOGITS, lambda m: m.logits),
        **sharded_tensors(masks, dims, layout, EXP_AVG, lambda m: _adam_state(optimizer, m.logits)["exp_avg"]),
        **sharded_tensors(masks, dims, layout, EXP_AVG_SQ, lambda m: _adam_state(optimizer, m.logits)["exp_avg_sq"]),
        # Every rank of a DP replica reads the same windows; one of them (replica_id 0) writes them.
        "data_stream": ShardedObject("data_stream", stream.state_dict(), (layout.dp_size,), (layout.dp_rank,),
                                     replica_id=layout.tp_rank + layout.tp_size * layout.pp_rank),
        "rng": ShardedObject("rng", _rng_payload(masks), (layout.pp_size, layout.tp_size, layout.dp_size),
                             (layout.pp_rank, layout.tp_rank, layout.dp_rank), replica_id=0),
        "step": step, "history": history, "layout": _layout_dict(layout),
        "optimizer": {"step": adam_step, "param_groups": [{k: v for k, v in g.items() if k != "params"}
                                                          for g in optimizer.param_groups]},
    }
    dist_checkpointing.save(state, str(tmp))
    dist.barrier()
    if rank == 0:
        if final.exists():  # left by a run killed between rename and pointer update
            shutil.rmtree(final)
        tmp.rename(final)
        atomic_write_text(root / LATEST, final.name)
        finished = sorted(p for p in root.glob("step_*") if (p / "metadata.json").is_file())
        for old in finished[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def _rng_payload(masks: MaskSet) -> dict[str, Any]:
    return {"global": rng_state(), "masks": {name: s.mask.generator.get_state() for name, s in masks.items()}}


def load(folder: Path, masks: MaskSet, optimizer: torch.optim.Optimizer, stream, dims: LlamaDims,
         layout: Layout) -> tuple[int, dict[str, Any]]:
    """Restore logits, optimizer, data position and (same layout only) RNG; returns (step, history)."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing import ShardedObject

    common = dist_checkpointing.load_common_state_dict(str(folder))
    saved = common["layout"]
    saved_dp = saved["dp_size"]
    if saved_dp != layout.dp_size:
        raise CheckpointError(
            f"{folder} was saved with {saved_dp} data-parallel replicas, this run has {layout.dp_size}: the data "
            f"streams cannot be resumed; resume with parallel.data={saved_dp} (tensor/pipeline sizes may change)")
    same_layout = (saved["tp_size"], saved["pp_size"]) == (layout.tp_size, layout.pp_size)
    zeros = lambda m: torch.zeros_like(m.logits)  # noqa: E731  (targets the loader fills)
    request: dict[str, Any] = {
        **sharded_tensors(masks, dims, layout, LOGITS, zeros),
        **sharded_tensors(masks, dims, layout, EXP_AVG, zeros),
        **sharded_tensors(masks, dims, layout, EXP_AVG_SQ, zeros),
        "data_stream": ShardedObject("data_stream", None, (layout.dp_size,), (layout.dp_rank,),
                                     replica_id=layout.tp_rank + layout.tp_size * layout.pp_rank),
    }
    if same_layout:
        request["rng"] = ShardedObject("rng", None, (layout.pp_size, layout.tp_size, layout.dp_size),
                                       (layout.pp_rank, layout.tp_rank, layout.dp_rank), replica_id=0)
    try:
        loaded = dist_checkpointing.load(request, str(folder))
    except Exception as exc:
        raise CheckpointError(f"cannot load checkpoint {folder} on {layout.describe()}: {exc}") from exc
    adam_step = torch.tensor(float(common["optimizer"]["step"]))
    with torch.no_grad():
        for s in masks.values():
            pieces = {prefix: {n: loaded[prefix + n] for n in s.hf_weights} for prefix in (LOGITS, EXP_AVG, EXP_AVG_SQ)}
            s.mask.load_logits(join_pieces(s, pieces[LOGITS], dims, layout), what=f"checkpointed logits of {s.name}")
            optimizer.state[s.mask.logits] = {
                "step": adam_step.clone(),
                "exp_avg": join_pieces(s, pieces[EXP_AVG], dims, layout).to(s.mask.logits.dtype),
                "exp_avg_sq": join_pieces(s, pieces[EXP_AVG_SQ], dims, layout).to(s.mask.logits.dtype),
            }
    for group, saved_group in zip(optimizer.param_groups, common["optimizer"]["param_groups"]):
        group.update(saved_group)
    stream.load_state_dict(loaded["data_stream"])
    if same_layout:
        payload = loaded["rng"]
        set_rng_state(payload["global"])
        for name, s in masks.items():
            s.mask.generator.set_state(payload["masks"][name])
    else:
        log.warning("%s was saved at TP=%d PP=%d, now TP=%d PP=%d: logits, optimizer and data position are "
                    "resharded; the mask noise starts from fresh per-shard generators", folder.name, saved["tp_size"],
                    saved["pp_size"], layout.tp_size, layout.pp_size)
    return int(common["step"]), common["history"]
