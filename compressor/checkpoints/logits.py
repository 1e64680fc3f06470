"""Learned-mask logits on disk (MaskLLM-style), and the masks they select.

A weight (out, in) at N:M sparsity has one logit per candidate pattern of each group:
(out, in / M, C(M, N)), patterns in the order of ``compressor.sparsity.nm_patterns``. The file is a
safetensors file keyed by weight name with metadata ``{"format": "compressor.logits.v1", "sparsity": "N:M"}``.
"""

from __future__ import annotations

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
DIST_PREFIX = "logits/"  # key prefix of the logits in a distributed (`compressor launch`) checkpoint


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

    ``folder`` is a ``checkpoints/step_*`` folder of `compressor launch` (every rank's pieces, keyed
    ``logits/<weight name>``; see ``compressor.parallel.megatron_checkpoint``). No process group is
    needed: each tensor is assembled from every rank's pieces.
    """
    from compressor.checkpoints.pieces import PieceReader

    reader = PieceReader(folder)
    wanted = [k for k in reader.keys() if k.startswith(DIST_PREFIX)]
    if not wanted:
        raise CheckpointError(f"{folder} holds no {DIST_PREFIX}* tensors (not a mask-learning checkpoint)")
    return {k[len(DIST_PREFIX):]: reader.read_full(k) for k in wanted}


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
