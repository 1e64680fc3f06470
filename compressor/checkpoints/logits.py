"""Learned-mask logits on disk (MaskLLM-style), and the masks they select.

A weight (out, in) at N:M sparsity has one logit per candidate pattern of each group:
(out, in / M, C(M, N)), patterns in the order of ``compressor.sparsity.nm_patterns``. The file is a
safetensors file keyed by weight name with metadata ``{"format": "compressor.logits.v1", "sparsity": "N:M"}``;
a run with a mixed plan writes ``"levels"`` (JSON, weight name -> "N:M") and ``"sparsity": "mixed"``.
"""

from __future__ import annotations

import json
from math import comb
from pathlib import Path
from typing import Mapping, Optional

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


def save_logits(path: str | Path, logits: Mapping[str, torch.Tensor], sparsity: NM | str,
                levels: Optional[Mapping[str, NM]] = None) -> None:
    """``levels``: each layer's own N:M by weight name (a mixed plan; ``sparsity`` is then ignored)."""
    per_layer = {name: NM.parse(levels[name]) if levels else NM.parse(sparsity) for name in logits}
    for name, value in logits.items():
        _check_shape(name, value, per_layer[name], str(path))
    tensors = {name: value.detach().float().cpu().contiguous() for name, value in logits.items()}
    atomic_save_safetensors(tensors, path, metadata=logits_metadata(per_layer, sparsity, levels))


def logits_metadata(per_layer: Mapping[str, NM], sparsity: NM | str, levels: Optional[Mapping[str, NM]] = None
                    ) -> dict[str, str]:
    """The metadata of a logits file of these layers (weight name -> its N:M)."""
    meta = {"format": FORMAT, "sparsity": str(NM.parse(sparsity)) if not levels else "mixed"}
    if levels:
        meta["levels"] = json.dumps({name: str(nm) for name, nm in per_layer.items()})
    return meta


def logits_shape(out_features: int, in_features: int, nm: NM) -> tuple[int, int, int]:
    """(out, in / M, C(M, N)): the logits of one weight."""
    return (out_features, in_features // nm.m, comb(nm.m, nm.n))


def logits_sparsity(path: str | Path) -> Optional[NM]:
    """The N:M sparsity a logits file was learned for; None for a file of mixed levels (``logits_levels``)."""
    with _open(path) as fh:
        meta = fh.metadata() or {}
        return None if "levels" in meta else _sparsity(meta, path)


def logits_levels(path: str | Path) -> dict[str, NM]:
    """Each layer's N:M (weight name -> NM), for uniform and mixed files alike."""
    with _open(path) as fh:
        return _levels(fh.metadata() or {}, list(fh.keys()), path)


def load_logits(path: str | Path) -> dict[str, torch.Tensor]:
    """All logits in ``path``: name -> (out, in / M, C(M, N)) float tensor."""
    path = Path(path)
    try:
        with _open(path) as fh:
            levels = _levels(fh.metadata() or {}, list(fh.keys()), path)
            out = {name: fh.get_tensor(name) for name in fh.keys()}
    except CheckpointError:
        raise
    except Exception as exc:  # safetensors raises several types for truncated / corrupt files
        raise CheckpointError(f"cannot read logits file {path}: {exc}") from exc
    for name, value in out.items():
        _check_shape(name, value, levels[name], str(path))
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


def logits_to_masks(logits: Mapping[str, torch.Tensor], nm: NM | str | Mapping[str, NM]) -> dict[str, torch.Tensor]:
    """The most likely pattern of every group: name -> (out, in) bool mask with exactly N kept per group.
    ``nm``: one N:M for all, or each name's own."""
    masks = {}
    for name, value in logits.items():
        level = NM.parse(nm[name] if isinstance(nm, Mapping) else nm)
        _check_shape(name, value, level, "logits")
        index = value.argmax(dim=-1)  # (out, in/M)
        masks[name] = patterns_to_mask(index, level)  # (out, in)
    return masks


def _open(path: str | Path):
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"logits file {path} does not exist")
    try:
        return safe_open(str(path), framework="pt")
    except Exception as exc:
        raise CheckpointError(f"cannot read logits file {path}: {exc}") from exc


def _levels(meta: dict, names: list[str], path: str | Path) -> dict[str, NM]:
    if "levels" not in meta:
        return dict.fromkeys(names, _sparsity(meta, path))
    if meta.get("format") != FORMAT:
        _sparsity(meta, path)  # raises: not a logits file
    try:
        levels = {name: NM.parse(text) for name, text in json.loads(meta["levels"]).items()}
    except (ValueError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"{path}: bad per-layer levels in the metadata ({exc})") from exc
    missing = [n for n in names if n not in levels]
    if missing:
        raise CheckpointError(f"{path}: no level recorded for the logits of {missing[0]}")
    return levels


def _sparsity(meta: dict, path: str | Path) -> NM:
    if meta.get("format") != FORMAT:
        raise CheckpointError(
            f"{path} is not a compressor logits file (format {meta.get('format')!r}, expected {FORMAT!r})"
        )
    try:
        return NM.parse(meta.get("sparsity", ""))
    except ValueError as exc:
        raise CheckpointError(f"{path}: bad sparsity {meta.get('sparsity')!r} in the metadata ({exc})") from exc
