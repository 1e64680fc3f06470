"""Distributed checkpoints of mask learning: every rank writes its own pieces, any layout reads them.

A checkpoint is a folder ``step_<N>/`` written by every rank at once:

- ``pieces-<rank>.safetensors`` (data-parallel replica 0 only: the others hold duplicates): this rank's
  chunks of ``logits/<HF weight name>``, ``optim/exp_avg/...`` and ``optim/exp_avg_sq/...``, each the
  tensor-parallel chunk of a global HF-shaped tensor, so the folder reloads at another TP / PP layout
  (``compressor.checkpoints.pieces`` reads any chunk of any split);
- ``state-<rank>``: the rank's data-stream position and its mask-noise generators and torch / python /
  numpy RNG (restored only when the layout is unchanged: noise is drawn per shard, so another layout
  starts fresh generators);
- ``common`` (rank 0): step, history, layout, AdamW's step count and hyper-parameters;
- ``meta.json``, written last by rank 0 once every rank has finished.

Everything is safetensors plus JSON (``compressor.checkpoints.tree``): nothing is unpickled on resume.
The folder is written under a hidden temporary name and renamed when complete; ``latest`` (replaced
atomically) then names it, and older checkpoints beyond ``keep`` are removed. A run killed mid-save
therefore resumes from the previous checkpoint.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from compressor.checkpoints.logits import DIST_PREFIX
from compressor.checkpoints.pieces import PieceReader, PieceSpec, pieces_file, write_pieces
from compressor.checkpoints.tree import load_tree, save_tree
from compressor.errors import CheckpointError
from compressor.parallel.megatron_convert import LlamaDims
from compressor.parallel.megatron_masks import MaskSet, join_pieces, local_pieces
from compressor.parallel.megatron_model import Layout
from compressor.training import checkpoint as training_checkpoint
from compressor.training.checkpoint import COMPLETE, LATEST, remove_old_checkpoints, rng_state, set_rng_state, step_dir
from compressor.utils.fs import atomic_write_json, atomic_write_text
from compressor.utils.logging import get_logger

log = get_logger(__name__)

LOGITS, EXP_AVG, EXP_AVG_SQ = DIST_PREFIX, "optim/exp_avg/", "optim/exp_avg_sq/"
FORMAT = "compressor.dist-checkpoint.v1"


def step_name(step: int) -> str:
    return step_dir(Path("."), step).name


def latest_checkpoint(root: str | Path) -> Optional[Path]:
    return training_checkpoint.latest_checkpoint(root, complete_marker=COMPLETE)


def _adam_state(optimizer: torch.optim.Optimizer, param: torch.Tensor) -> dict[str, torch.Tensor]:
    state = optimizer.state.get(param)
    if not state:
        raise CheckpointError("the optimizer has no state yet; checkpoint after the first step")
    return state


def _layout_dict(layout: Layout) -> dict[str, int]:
    return {"tp_size": layout.tp_size, "pp_size": layout.pp_size, "dp_size": layout.dp_size}


def _coords(layout: Layout) -> list[int]:
    return [layout.pp_rank, layout.tp_rank, layout.dp_rank]


def _pieces(masks: MaskSet, dims: LlamaDims, layout: Layout, of: dict[str, Callable[[Any], torch.Tensor]]
            ) -> dict[str, tuple[torch.Tensor, PieceSpec]]:
    return {prefix + p.hf_name: (p.tensor.detach().contiguous(), PieceSpec(p.dim, p.rank, p.parts))
            for prefix, tensor_of in of.items() for p in local_pieces(masks, dims, layout, tensor_of)}


def _my_pieces(masks: MaskSet, dims: LlamaDims, layout: Layout, optimizer) -> dict[str, tuple[torch.Tensor, PieceSpec]]:
    return _pieces(masks, dims, layout, {
        LOGITS: lambda m: m.logits, EXP_AVG: lambda m: _adam_state(optimizer, m.logits)["exp_avg"],
        EXP_AVG_SQ: lambda m: _adam_state(optimizer, m.logits)["exp_avg_sq"]})


def piece_layout(masks: MaskSet, dims: LlamaDims, layout: Layout
                 ) -> dict[str, tuple[torch.Size, torch.dtype, PieceSpec]]:
    """Name -> (shape, dtype, spec) of every piece ``save`` writes for this rank, from the logits alone (torch's
    AdamW keeps its states in the logits' shape and dtype); works on a meta-device model."""
    return {name: (t.shape, t.dtype, spec) for name, (t, spec) in
            _pieces(masks, dims, layout, dict.fromkeys((LOGITS, EXP_AVG, EXP_AVG_SQ), lambda m: m.logits)).items()}


def save(root: str | Path, step: int, masks: MaskSet, optimizer: torch.optim.Optimizer, stream, dims: LlamaDims,
         layout: Layout, history: dict[str, Any], keep: int = 2) -> Path:
    """Every rank calls this (a collective); returns the finished checkpoint folder."""
    root = Path(root)
    final, tmp = root / step_name(step), root / f".{step_name(step)}.tmp"
    rank = dist.get_rank()
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    if layout.dp_rank == 0:
        write_pieces(pieces_file(tmp, rank), _my_pieces(masks, dims, layout, optimizer))
    save_tree(tmp / f"state-{rank:05d}", {"coords": _coords(layout), "stream": stream.state_dict(),
                                          "rng": _rng_payload(masks)})
    if rank == 0:
        first = next(iter(masks.values())).mask.logits
        save_tree(tmp / "common", {
            "step": step, "history": history, "layout": _layout_dict(layout),
            "optimizer": {"step": float(_adam_state(optimizer, first)["step"]),
                          "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]},
        })
    dist.barrier()
    if rank == 0:
        atomic_write_json(tmp / COMPLETE, {"format": FORMAT, "step": step, "world_size": dist.get_world_size()})
        if final.exists():  # left by a run killed between rename and pointer update
            shutil.rmtree(final)
        tmp.rename(final)
        atomic_write_text(root / LATEST, final.name)
        remove_old_checkpoints(root, keep, COMPLETE)
    dist.barrier()
    return final


def _rng_payload(masks: MaskSet) -> dict[str, Any]:
    return {"global": rng_state(), "masks": {name: s.mask.generator.get_state() for name, s in masks.items()}}


def _state_of(folder: Path, coords: list[int], world: int, match: slice) -> Optional[dict[str, Any]]:
    """The saved per-rank state whose coordinates equal ``coords`` in the positions ``match`` selects."""
    for rank in range(world):
        state = load_tree(folder / f"state-{rank:05d}")
        if state["coords"][match] == coords[match]:
            return state
    return None


def load(folder: Path, masks: MaskSet, optimizer: torch.optim.Optimizer, stream, dims: LlamaDims,
         layout: Layout) -> tuple[int, dict[str, Any]]:
    """Restore logits, optimizer, data position and (same layout only) RNG; returns (step, history)."""
    from compressor.utils.fs import read_json

    meta = read_json(folder / COMPLETE, CheckpointError)
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{folder} is not a compressor distributed checkpoint (format {meta.get('format')!r}; "
                              "checkpoints of earlier versions are not read); start over in a new output folder")
    common = load_tree(folder / "common")
    saved = common["layout"]
    saved_dp = saved["dp_size"]
    if saved_dp != layout.dp_size:
        raise CheckpointError(
            f"{folder} was saved with {saved_dp} data-parallel replicas, this run has {layout.dp_size}: the data "
            f"streams cannot be resumed; resume with parallel.data={saved_dp} (tensor/pipeline sizes may change)")
    same_layout = (saved["tp_size"], saved["pp_size"]) == (layout.tp_size, layout.pp_size)
    reader = PieceReader(folder)
    adam_step = torch.tensor(float(common["optimizer"]["step"]))
    with torch.no_grad():
        for s in masks.values():
            def joined(prefix: str, like: torch.Tensor) -> torch.Tensor:
                wanted = {p.hf_name: PieceSpec(p.dim, p.rank, p.parts)
                          for p in local_pieces({s.name: s}, dims, layout, lambda m: m.logits)}
                return join_pieces(s, {n: reader.read(prefix + n, spec) for n, spec in wanted.items()}, dims,
                                   layout).to(like.dtype)

            logits = s.mask.logits
            s.mask.load_logits(joined(LOGITS, logits), what=f"checkpointed logits of {s.name}")
            optimizer.state[logits] = {"step": adam_step.clone(), "exp_avg": joined(EXP_AVG, logits),
                                       "exp_avg_sq": joined(EXP_AVG_SQ, logits)}
    for group, saved_group in zip(optimizer.param_groups, common["optimizer"]["param_groups"]):
        group.update(saved_group)
    world = meta["world_size"]
    coords = _coords(layout)
    stream_state = _state_of(folder, coords, world, slice(2, 3))  # any rank of this data-parallel replica
    stream.load_state_dict(stream_state["stream"])
    if same_layout:
        payload = _state_of(folder, coords, world, slice(0, 3))["rng"]
        set_rng_state(payload["global"])
        for name, s in masks.items():
            s.mask.generator.set_state(payload["masks"][name])
    else:
        log.warning("%s was saved at TP=%d PP=%d, now TP=%d PP=%d: logits, optimizer and data position are "
                    "resharded; the mask noise starts from fresh per-shard generators", folder.name, saved["tp_size"],
                    saved["pp_size"], layout.tp_size, layout.pp_size)
    return int(common["step"]), common["history"]
