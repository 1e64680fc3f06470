"""Bit-packing of masks: one bit per weight, little-endian within each byte, along the last dim.

Byte b of a row holds elements 8b .. 8b+7, element 8b+j in bit j; the same layout as
``numpy.packbits(mask, axis=-1, bitorder="little")``. Rows are padded with zeros to whole bytes.
"""

from __future__ import annotations

from typing import Iterator, Mapping

import torch

_BIT_WEIGHTS = torch.tensor([1 << j for j in range(8)], dtype=torch.int16)


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """(..., K) bool -> (..., ceil(K / 8)) uint8."""
    k = mask.shape[-1]
    pad = (-k) % 8
    bits = mask.bool()
    if pad:
        bits = torch.nn.functional.pad(bits, (0, pad))
    bits = bits.reshape(*mask.shape[:-1], (k + pad) // 8, 8)  # (..., bytes, 8)
    packed = (bits.to(torch.int16) * _BIT_WEIGHTS.to(mask.device)).sum(dim=-1)
    return packed.to(torch.uint8)


def unpack_bits(packed: torch.Tensor, k: int) -> torch.Tensor:
    """(..., B) uint8 -> (..., k) bool; inverse of :func:`pack_bits` for a row width ``k``."""
    if packed.dtype != torch.uint8:
        raise ValueError(f"packed masks are uint8, got {packed.dtype}")
    if packed.shape[-1] * 8 < k or packed.shape[-1] != (k + 7) // 8:
        raise ValueError(f"{packed.shape[-1]} bytes per row cannot hold a row of {k} bits")
    bits = (packed.unsqueeze(-1).to(torch.int16) & _BIT_WEIGHTS.to(packed.device)) != 0
    return bits.reshape(*packed.shape[:-1], packed.shape[-1] * 8)[..., :k]


class PackedMasks(Mapping[str, torch.Tensor]):
    """Bool masks by name, held packed (a bit per weight instead of a byte) and unpacked on access: what a
    pipeline keeps of every layer it has pruned, which for a whole model is an eighth of its bool masks."""

    def __init__(self) -> None:
        self._packed: dict[str, torch.Tensor] = {}
        self._width: dict[str, int] = {}

    def __setitem__(self, name: str, mask: torch.Tensor) -> None:
        self._packed[name], self._width[name] = pack_bits(mask.bool()), mask.shape[-1]

    def __getitem__(self, name: str) -> torch.Tensor:
        return unpack_bits(self._packed[name], self._width[name])

    def __contains__(self, name: object) -> bool:
        return name in self._packed

    def __iter__(self) -> Iterator[str]:
        return iter(self._packed)

    def __len__(self) -> int:
        return len(self._packed)
