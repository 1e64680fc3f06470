"""Masks on disk: one bit per weight, packed along each row, in a safetensors file.

Keys are the weight names (``model.layers.0.self_attn.q_proj.weight``); the metadata records each
mask's shape (rows are padded to whole bytes) and the sparsity the masks were made for: ``sparsity``
(one level for every mask: "2:4", "0.5") and/or ``levels`` (JSON, weight name -> level, written by runs
with a sparsity plan; files without it are uniform).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
from safetensors import safe_open

from compressor.errors import CheckpointError
from compressor.sparsity.bitpack import pack_bits, unpack_bits
from compressor.sparsity.nm import SparsityTarget
from compressor.sparsity.plan import parse_level
from compressor.utils.fs import atomic_save_safetensors

FORMAT = "compressor.masks.v1"


def save_masks(path: str | Path, masks: Mapping[str, torch.Tensor], sparsity: Optional[str] = None,
               levels: Optional[Mapping[str, str]] = None) -> None:
    """``levels``: each mask's level text by weight name (a mixed plan); ``sparsity``: the one level of all."""
    packed = {name: pack_bits(mask.bool().cpu()).contiguous() for name, mask in masks.items()}
    meta = masks_metadata({name: tuple(mask.shape) for name, mask in masks.items()}, sparsity, levels)
    atomic_save_safetensors(packed, path, metadata=meta)


def masks_metadata(shapes: Mapping[str, tuple[int, ...]], sparsity: Optional[str] = None,
                   levels: Optional[Mapping[str, str]] = None) -> dict[str, str]:
    """The metadata of a mask file holding masks of these (unpacked) shapes, by weight name."""
    meta = {"format": FORMAT, "shapes": json.dumps({name: list(shape) for name, shape in shapes.items()})}
    if sparsity is not None:
        meta["sparsity"] = str(sparsity)
    if levels is not None:
        missing = sorted(set(shapes) - set(levels))
        if missing:
            raise ValueError(f"save_masks: no level for {len(missing)} masks, e.g. {missing[0]}")
        meta["levels"] = json.dumps({name: str(levels[name]) for name in shapes})
    return meta


def packed_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape ``pack_bits`` gives a mask of ``shape``: rows padded to whole bytes."""
    return (*shape[:-1], (shape[-1] + 7) // 8)


class MaskReader:
    """Masks read one at a time from a mask file (``load_masks`` reads them all)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise CheckpointError(f"mask file {path} does not exist")
        try:
            self._fh = safe_open(str(self.path), framework="pt")
            meta = self._fh.metadata() or {}
            if meta.get("format") != FORMAT:
                raise CheckpointError(f"{path} is not a compressor mask file (format {meta.get('format')!r})")
            self._shapes = json.loads(meta["shapes"])
        except CheckpointError:
            raise
        except Exception as exc:
            raise CheckpointError(f"cannot read mask file {path}: {exc}") from exc

    def keys(self) -> list[str]:
        return list(self._fh.keys())

    def __contains__(self, name: str) -> bool:
        return name in self._shapes

    def get(self, name: str) -> torch.Tensor:
        if name not in self._shapes:
            raise CheckpointError(f"{self.path}: mask {name} has no recorded shape")
        rows, cols = self._shapes[name][:-1], self._shapes[name][-1]
        return unpack_bits(self._fh.get_tensor(name), cols).reshape(*rows, cols)


def load_masks(path: str | Path) -> dict[str, torch.Tensor]:
    """All masks in ``path`` as bool tensors of their original shapes."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"mask file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            if meta.get("format") != FORMAT:
                raise CheckpointError(f"{path} is not a compressor mask file (format {meta.get('format')!r})")
            shapes = json.loads(meta["shapes"])
            out = {}
            for name in fh.keys():
                if name not in shapes:
                    raise CheckpointError(f"{path}: mask {name} has no recorded shape")
                rows, cols = shapes[name][:-1], shapes[name][-1]
                out[name] = unpack_bits(fh.get_tensor(name), cols).reshape(*rows, cols)
            return out
    except CheckpointError:
        raise
    except Exception as exc:  # safetensors raises several types for truncated / corrupt files
        raise CheckpointError(f"cannot read mask file {path}: {exc}") from exc


def mask_file_sparsity(path: str | Path) -> Optional[str]:
    with safe_open(str(path), framework="pt") as fh:
        return (fh.metadata() or {}).get("sparsity")


def metadata_levels(meta: Mapping[str, str], path: Any = "masks") -> Optional[dict[str, SparsityTarget]]:
    """Per-mask levels (weight name -> level) from a mask or logits file's metadata; None for a uniform
    file (one ``sparsity`` for all, as every file before sparsity plans)."""
    if "levels" not in meta:
        return None
    try:
        return {name: parse_level(text) for name, text in json.loads(meta["levels"]).items()}
    except (ValueError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"{path}: bad per-layer levels in the metadata ({exc})") from exc


def mask_file_levels(path: str | Path) -> Optional[dict[str, SparsityTarget]]:
    with safe_open(str(path), framework="pt") as fh:
        return metadata_levels(fh.metadata() or {}, path)
