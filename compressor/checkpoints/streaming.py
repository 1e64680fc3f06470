"""Safetensors written piece by piece, so that no writer holds a whole model.

- ``StreamingHFWriter``: an HF folder of one shard per decoder block, each written (atomically) as it is
  finished; the index, config and tokenizer come last, then the folder is renamed into place.
- ``stream_safetensors``: one ordinary safetensors file whose tensors arrive one at a time. Its header
  (every name, dtype and shape, so every offset) is known up front and written first; each tensor's
  bytes follow in the declared order. Written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Mapping, Optional, Sequence

import torch

from compressor.utils.fs import atomic_path, atomic_save_safetensors, atomic_write_json, move_dir_into_place

# torch dtype -> safetensors dtype name (the format's own spelling)
SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                      torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                      torch.uint8: "U8", torch.bool: "BOOL"}


@contextmanager
def stream_safetensors(path: str | Path, entries: Sequence[tuple[str, torch.dtype, Sequence[int]]],
                       metadata: Optional[Mapping[str, str]] = None) -> Iterator[Callable[[str, torch.Tensor], None]]:
    """Yield ``write(name, tensor)``; call it once per entry (name, dtype, shape), in ``entries``' order.

    The file is renamed onto ``path`` only if the block ends with every entry written; it reads like any
    safetensors file (``safe_open``, ``load_file``). Memory: one tensor at a time.
    """
    header: dict[str, object] = {}
    offset = 0
    for name, dtype, shape in entries:
        if name in header:
            raise ValueError(f"stream_safetensors: {name} is declared twice")
        size = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": [int(d) for d in shape],
                        "data_offsets": [offset, offset + size]}
        offset += size
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the format pads the header to 8 bytes
    expected = iter(entries)
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        fh.write(len(raw).to_bytes(8, "little"))
        fh.write(raw)

        def write(name: str, tensor: torch.Tensor) -> None:
            want = next(expected, None)
            if want is None or want[0] != name:
                raise ValueError(f"stream_safetensors: got {name}, expected {want[0] if want else 'no more tensors'}")
            if tensor.dtype != want[1] or tuple(tensor.shape) != tuple(want[2]):
                raise ValueError(f"stream_safetensors: {name} is {tensor.dtype} {tuple(tensor.shape)}, declared "
                                 f"{want[1]} {tuple(want[2])}")
            flat = tensor.detach().cpu().contiguous().reshape(-1)
            fh.write(memoryview(flat.view(torch.uint8).numpy()))  # little-endian, as the format wants

        yield write
        left = next(expected, None)
        if left is not None:
            raise ValueError(f"stream_safetensors: {path} is incomplete; {left[0]} was never written")
        fh.flush()


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
