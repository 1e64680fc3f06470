"""Per-block results on disk, so that an interrupted sequential run resumes from the last finished block.

One safetensors file per finished block holds each layer's packed mask, its new weight when the
method changed the kept values, and the method's report items in the metadata. Files are written
atomically: a block either has a complete file or none.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch
from safetensors import safe_open

from compressor.errors import CheckpointError
from compressor.methods.registry import LayerResult
from compressor.sparsity.bitpack import pack_bits, unpack_bits
from compressor.utils.fs import atomic_save_safetensors


class BlockStore:
    def __init__(self, folder: Optional[str | Path]) -> None:
        self.folder = Path(folder) if folder is not None else None

    def _path(self, block: int) -> Path:
        assert self.folder is not None
        return self.folder / f"block_{block:05d}.safetensors"

    def has(self, block: int) -> bool:
        return self.folder is not None and self._path(block).is_file()

    def save(self, block: int, results: list[LayerResult]) -> None:
        if self.folder is None:
            return
        tensors: dict[str, torch.Tensor] = {}
        meta = []
        for r in results:
            tensors[f"{r.name}:mask"] = pack_bits(r.mask)
            if r.weight is not None:
                tensors[f"{r.name}:weight"] = r.weight.contiguous()
            if r.warm_start_mask is not None:
                tensors[f"{r.name}:warm_start_mask"] = pack_bits(r.warm_start_mask)
            meta.append({"name": r.name, "shape": list(r.mask.shape), "seconds": r.seconds, "extra": r.extra})
        atomic_save_safetensors(tensors, self._path(block), metadata={"layers": json.dumps(meta)})

    def load(self, block: int) -> list[LayerResult]:
        path = self._path(block)
        try:
            with safe_open(str(path), framework="pt") as fh:
                meta = json.loads((fh.metadata() or {})["layers"])
                keys = set(fh.keys())
                out = []
                for row in meta:
                    name, cols = row["name"], row["shape"][-1]

                    def get(suffix: str, bits: bool) -> Optional[torch.Tensor]:
                        key = f"{name}:{suffix}"
                        if key not in keys:
                            return None
                        t = fh.get_tensor(key)
                        return unpack_bits(t, cols) if bits else t

                    out.append(LayerResult(name, get("mask", True), get("weight", False), row["seconds"],
                                           row["extra"], warm_start_mask=get("warm_start_mask", True)))
                return out
        except Exception as exc:
            raise CheckpointError(
                f"cannot read the saved results of block {block} at {path} ({exc}); delete that file to redo the block"
            ) from exc
