"""Tensors saved in pieces by many ranks, read back at any other split (safetensors, no pickle).

A piece is chunk ``rank`` of ``parts`` equal chunks of a global tensor along one dimension (how
tensor-parallel shards split a weight). Each writer stores its pieces in ``pieces-<rank>.safetensors``
with their (dim, rank, parts) in the file's metadata; a reader asks for any chunk of any split and
gets it assembled from the overlapping stored pieces, read by slices, so a checkpoint written at TP=2
loads at TP=1 or TP=4 without any rank reading whole tensors it does not need.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch

from compressor.errors import CheckpointError
from compressor.utils.fs import atomic_save_safetensors

FORMAT = "compressor.pieces.v1"


@dataclass(frozen=True)
class PieceSpec:
    dim: int
    rank: int
    parts: int


def pieces_file(folder: Path, rank: int) -> Path:
    return folder / f"pieces-{rank:05d}.safetensors"


def write_pieces(path: Path, pieces: Mapping[str, tuple[torch.Tensor, PieceSpec]]) -> None:
    specs = {k: [s.dim, s.rank, s.parts] for k, (_, s) in pieces.items()}
    atomic_save_safetensors({k: t.detach().cpu() for k, (t, _) in pieces.items()}, path,
                            metadata={"format": FORMAT, "pieces": json.dumps(specs)})


@dataclass(frozen=True)
class _Stored:
    file: Path
    spec: PieceSpec
    shape: tuple[int, ...]


class PieceReader:
    """Every piece stored in a folder, by key; reads any chunk of any split of a key's global tensor."""

    def __init__(self, folder: str | Path) -> None:
        from safetensors import safe_open

        self.folder = Path(folder)
        self._stored: dict[str, list[_Stored]] = {}
        files = sorted(self.folder.glob("pieces-*.safetensors"))
        if not files:
            raise CheckpointError(f"{self.folder} holds no pieces-*.safetensors files")
        for file in files:
            try:
                with safe_open(str(file), framework="pt") as fh:
                    meta = fh.metadata() or {}
                    if meta.get("format") != FORMAT:
                        raise CheckpointError(f"{file} is not a compressor pieces file")
                    for key, (dim, rank, parts) in json.loads(meta["pieces"]).items():
                        shape = tuple(fh.get_slice(key).get_shape())
                        self._stored.setdefault(key, []).append(_Stored(file, PieceSpec(dim, rank, parts), shape))
            except CheckpointError:
                raise
            except Exception as exc:  # safetensors raises several types for truncated / corrupt files
                raise CheckpointError(f"cannot read {file}: {exc}") from exc
        for key, stored in self._stored.items():
            self._check_complete(key, stored)

    def keys(self) -> list[str]:
        return sorted(self._stored)

    def _check_complete(self, key: str, stored: list[_Stored]) -> None:
        spec = stored[0].spec
        ranks = sorted(s.spec.rank for s in stored)
        if any(s.spec.dim != spec.dim or s.spec.parts != spec.parts for s in stored) or ranks != list(range(spec.parts)):
            raise CheckpointError(f"{self.folder}: the pieces of {key} do not make up the whole tensor "
                                  f"(chunks {ranks} of {spec.parts}); the checkpoint is incomplete")

    def global_shape(self, key: str) -> tuple[int, ...]:
        first = self._stored[key][0]
        shape = list(first.shape)
        shape[first.spec.dim] *= first.spec.parts
        return tuple(shape)

    def read(self, key: str, want: PieceSpec) -> torch.Tensor:
        """Chunk ``want.rank`` of ``want.parts`` along ``want.dim`` of ``key``'s global tensor."""
        from safetensors import safe_open

        if key not in self._stored:
            raise CheckpointError(f"{self.folder} has no tensor {key}; it was saved for another model or targets")
        stored = self._stored[key]
        dim = stored[0].spec.dim
        shape = self.global_shape(key)
        if want.dim != dim or shape[dim] % want.parts:
            raise CheckpointError(f"{key} was saved split along dim {dim}; cannot read chunk {want.rank} of "
                                  f"{want.parts} along dim {want.dim} of shape {shape}")
        size = shape[dim] // want.parts
        lo, hi = want.rank * size, (want.rank + 1) * size
        out_shape = list(shape)
        out_shape[dim] = size
        chunks = []
        for s in sorted(stored, key=lambda s: s.spec.rank):
            start = s.spec.rank * s.shape[dim]
            a, b = max(lo, start), min(hi, start + s.shape[dim])
            if a >= b:
                continue
            index = tuple([slice(None)] * dim + [slice(a - start, b - start)])
            with safe_open(str(s.file), framework="pt") as fh:
                chunks.append(fh.get_slice(key)[index])
        result = torch.cat(chunks, dim=dim)
        assert list(result.shape) == out_shape, (key, result.shape, out_shape)
        return result

    def read_full(self, key: str) -> torch.Tensor:
        return self.read(key, PieceSpec(self._stored[key][0].spec.dim, 0, 1))
