"""Learned-mask logits on disk (MaskLLM-style), and the masks they select.

A weight (out, in) at N:M sparsity has one logit per candidate pattern of each group:
(out, in / M, C(M, N)), patterns in the order of ``compressor.sparsity.nm_patterns``. The file is a
safetensors file keyed by weight name with metadata ``{"format": "compressor.logits.v1", "sparsity": "N:M"}``.
"""

from __future__ import annotations

import warnings
from math import comb
from pathlib import Path
from typing import Mapping

import torch
from safetensors import safe_open

from compressor.errors import CheckpointError
from compressor.sparsity.nm import NM
from compressor.sparsity.patterns import patterns_to_mask
from compressor.utils.fs import atomic_save_safetensors

FORMAT = "compressor.logits.v1"
DIST_PREFIX = "logits/"  # key prefix of the logits in a distributed (megatron dist_checkpointing) checkpoint


def _check_shape(name: str, logits: torch.Tensor, nm: NM, where: str) -> None:
    if logits.dim() != 3 or logits.shape[-1] != comb(nm.m, nm.n):
        raise CheckpointError(
            f"{where}: logits of {name} have shape {tuple(logits.shape)}; at {nm} they must be "
            f"(out, in/{nm.m}, {comb(nm.m, nm.n)})"
        )


def save_logits(path: str | Path, logits: Mapping[str, torch.Tensor], sparsity: NM | str) -> None:
    nm = NM.parse(sparsity)
    for name, value in logits.items():
        _check_shape(name, value, nm, str(path))
    tensors = {name: value.detach().float().cpu().contiguous() for name, value in logits.items()}
    atomic_save_safetensors(tensors, path, metadata={"format": FORMAT, "sparsity": str(nm)})


def logits_sparsity(path: str | Path) -> NM:
    """The N:M sparsity a logits file was learned for."""
    with _open(path) as fh:
        return _sparsity(fh.metadata() or {}, path)


def load_logits(path: str | Path) -> dict[str, torch.Tensor]:
    """All logits in ``path``: name -> (out, in / M, C(M, N)) float tensor."""
    path = Path(path)
    try:
        with _open(path) as fh:
            nm = _sparsity(fh.metadata() or {}, path)
            out = {name: fh.get_tensor(name) for name in fh.keys()}
    except CheckpointError:
        raise
    except Exception as exc:  # safetensors raises several types for truncated / corrupt files
        raise CheckpointError(f"cannot read logits file {path}: {exc}") from exc
    for name, value in out.items():
        _check_shape(name, value, nm, str(path))
    return out


def load_dist_logits(folder: str | Path) -> dict[str, torch.Tensor]:
    """The full (global-shape) logits of a distributed training checkpoint, read in one process.

    ``folder`` is a ``checkpoints/step_*`` folder of `compressor launch` (torch.distributed.checkpoint
    files written by megatron's dist_checkpointing, keyed ``logits/<weight name>``). No process group is
    needed: each tensor is assembled from every rank's shards.
    """
    import torch.distributed.checkpoint as dcp

    folder = Path(folder)
    try:
        metadata = dcp.FileSystemReader(str(folder)).read_metadata().state_dict_metadata
    except Exception as exc:
        raise CheckpointError(f"{folder} is not a readable distributed checkpoint: {exc}") from exc
    wanted = {k: m for k, m in metadata.items() if k.startswith(DIST_PREFIX) and hasattr(m, "size")}
    if not wanted:
        raise CheckpointError(f"{folder} holds no {DIST_PREFIX}* tensors (not a mask-learning checkpoint)")
    state = {k: torch.empty(tuple(m.size), dtype=m.properties.dtype) for k, m in wanted.items()}
    with warnings.catch_warnings():  # "torch.distributed is ... uninitialized": one process is the intent
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=str(folder), no_dist=True)
    return {k[len(DIST_PREFIX):]: v for k, v in state.items()}


def logits_to_masks(logits: Mapping[str, torch.Tensor], nm: NM | str) -> dict[str, torch.Tensor]:
    """The most likely pattern of every group: name -> (out, in) bool mask with exactly N kept per group."""
    nm = NM.parse(nm)
    masks = {}
    for name, value in logits.items():
        _check_shape(name, value, nm, "logits")
        index = value.argmax(dim=-1)  # (out, in/M)
        masks[name] = patterns_to_mask(index, nm)  # (out, in)
    return masks


def _open(path: str | Path):
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"logits file {path} does not exist")
    try:
        return safe_open(str(path), framework="pt")
    except Exception as exc:
        raise CheckpointError(f"cannot read logits file {path}: {exc}") from exc


def _sparsity(meta: dict, path: str | Path) -> NM:
    if meta.get("format") != FORMAT:
        raise CheckpointError(
            f"{path} is not a compressor logits file (format {meta.get('format')!r}, expected {FORMAT!r})"
        )
    try:
        return NM.parse(meta.get("sparsity", ""))
    except ValueError as exc:
        raise CheckpointError(f"{path}: bad sparsity {meta.get('sparsity')!r} in the metadata ({exc})") from exc
