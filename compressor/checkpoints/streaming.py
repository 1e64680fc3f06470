"""An HF safetensors folder written piece by piece: one shard per decoder block as it is finished.

This is how a model that never fits in memory is saved: each block is written (atomically) and then
released; the index, config and tokenizer come last, then the folder is renamed into place.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import torch

from compressor.utils.fs import atomic_save_safetensors, atomic_write_json, move_dir_into_place


class StreamingHFWriter:
    def __init__(self, final: str | Path) -> None:
        self.final = Path(final)
        self.final.parent.mkdir(parents=True, exist_ok=True)
        self.folder = self.final.parent / f".{self.final.name}.partial"  # survives a crash: blocks are reused
        self.folder.mkdir(exist_ok=True)

    def has(self, shard: str) -> bool:
        return (self.folder / f"{shard}.safetensors").is_file()

    def write(self, shard: str, tensors: Mapping[str, torch.Tensor]) -> None:
        # Callers pass each storage once (a tied LM head is left out), so no copies are needed.
        atomic_save_safetensors({k: v.detach().contiguous() for k, v in tensors.items()},
                                self.folder / f"{shard}.safetensors", metadata={"format": "pt"})

    def finish(self, config, tokenizer, generation_config=None, replace: bool = False) -> Path:
        from safetensors import safe_open

        weight_map, total = {}, 0
        for shard in sorted(self.folder.glob("*.safetensors")):
            with safe_open(str(shard), framework="pt") as fh:
                for name in fh.keys():
                    weight_map[name] = shard.name
            total += shard.stat().st_size
        atomic_write_json(self.folder / "model.safetensors.index.json",
                          {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))})
        config.save_pretrained(self.folder)
        if generation_config is not None:
            generation_config.save_pretrained(self.folder)
        tokenizer.save_pretrained(self.folder)
        move_dir_into_place(self.folder, self.final, replace)
        return self.final
