"""Compress one N:M-sparse weight into kept values plus a bitmask, and back.

Layout (the ``sparse-24-bitmask`` layout of compressed-tensors, generalised to N:M): a weight
``<layer>.weight`` of shape (out, in) becomes three tensors

* ``<layer>.compressed``: (out, in * N / M), the kept values row by row in their original order and dtype;
* ``<layer>.bitmask``: (out, ceil(in / 8)) uint8, one bit per original weight, little-endian along the row
  (``numpy.packbits(mask, axis=-1, bitorder="little")``);
* ``<layer>.shape``: (2, 1) int64, the dense shape.

Every group of M keeps exactly N positions, so the value tensor is rectangular: a group with fewer
than N non-zeros also keeps some of its zeros (the first ones). Pruned entries decompress to +0.0.
"""

from __future__ import annotations

from typing import Mapping

import torch

from compressor.errors import SparsityPatternError
from compressor.sparsity.bitpack import pack_bits, unpack_bits
from compressor.sparsity.nm import NM, assert_nm, check_divisible, group_view

SUFFIXES = ("compressed", "bitmask", "shape")


def layer_name(weight_name: str) -> str:
    """``model.layers.0.mlp.up_proj.weight`` -> ``model.layers.0.mlp.up_proj``."""
    return weight_name[: -len(".weight")] if weight_name.endswith(".weight") else weight_name


def compressed_keys(weight_name: str) -> dict[str, str]:
    """The stored tensor names of one compressed weight, by suffix."""
    prefix = layer_name(weight_name)
    return {suffix: f"{prefix}.{suffix}" for suffix in SUFFIXES}


def exact_nm_mask(weight: torch.Tensor, nm: NM, what: str = "tensor") -> torch.Tensor:
    """(out, in) -> (out, in) bool keeping exactly N per group of M: every non-zero, then the first zeros.

    Raises SparsityPatternError if a group holds more than N non-zeros.
    """
    check_divisible(weight.shape[-1], nm.m, what)
    nonzero = group_view(weight != 0, nm.m)  # (out, G, M)
    count = nonzero.sum(dim=-1, keepdim=True)  # (out, G, 1)
    if bool((count > nm.n).any()):
        assert_nm(weight, nm, what)  # raises, naming the first bad group
    if bool((count == nm.n).all()):
        return nonzero.reshape(weight.shape)
    zeros = ~nonzero
    rank = zeros.to(torch.int8).cumsum(dim=-1)  # 1-based rank of each zero within its group
    pad = zeros & (rank <= nm.n - count)  # the first N - count zeros
    return (nonzero | pad).reshape(weight.shape)


def compress_nm(weight: torch.Tensor, nm: NM, what: str = "tensor") -> dict[str, torch.Tensor]:
    """(out, in) N:M-sparse weight -> {"compressed", "bitmask", "shape"} (see the module docstring)."""
    if weight.dim() != 2:
        raise SparsityPatternError(
            f"{what}: only 2-D weights can be stored compressed, got shape {tuple(weight.shape)}"
        )
    mask = exact_nm_mask(weight, nm, what)
    rows, cols = weight.shape
    values = weight[mask].reshape(rows, cols * nm.n // nm.m)  # row-major: kept values in row order
    return {
        "compressed": values.contiguous(),
        "bitmask": pack_bits(mask).contiguous(),
        "shape": torch.tensor([rows, cols], dtype=torch.int64).reshape(2, 1),
    }


def unpack_nm_mask(bitmask: torch.Tensor, shape: tuple[int, int], nm: NM, what: str = "tensor") -> torch.Tensor:
    """(out, ceil(in / 8)) uint8 -> (out, in) bool, checking that every group keeps exactly N."""
    rows, cols = shape
    if bitmask.dtype != torch.uint8 or tuple(bitmask.shape) != (rows, (cols + 7) // 8):
        raise SparsityPatternError(
            f"{what}: bitmask is {tuple(bitmask.shape)} {bitmask.dtype}, expected ({rows}, {(cols + 7) // 8}) "
            f"uint8 for a ({rows}, {cols}) weight"
        )
    check_divisible(cols, nm.m, what)
    mask = unpack_bits(bitmask, cols)
    kept = group_view(mask, nm.m).sum(dim=-1)  # (out, G)
    bad = kept != nm.n
    if bad.any():
        row, group = (int(i) for i in bad.nonzero()[0])
        raise SparsityPatternError(
            f"{what}: {int(bad.sum())} of {bad.numel()} groups of the bitmask do not keep exactly {nm.n} of "
            f"{nm.m} (first: row {row}, group {group} keeps {int(kept[row, group])}); the checkpoint is "
            f"corrupt or was not written for {nm} sparsity"
        )
    return mask


def decompress_nm(parts: Mapping[str, torch.Tensor], nm: NM, what: str = "tensor") -> torch.Tensor:
    """{"compressed", "bitmask", "shape"} -> the dense (out, in) weight, zeros where pruned."""
    missing = [s for s in SUFFIXES if s not in parts]
    if missing:
        raise SparsityPatternError(f"{what}: compressed weight lacks its {', '.join(missing)} tensor(s)")
    shape = [int(v) for v in parts["shape"].flatten().tolist()]
    if len(shape) != 2 or min(shape) < 1:
        raise SparsityPatternError(f"{what}: stored shape {shape} is not the shape of a 2-D weight")
    rows, cols = shape
    values = parts["compressed"]
    check_divisible(cols, nm.m, what)
    expected = (rows, cols * nm.n // nm.m)
    if tuple(values.shape) != expected:
        raise SparsityPatternError(
            f"{what}: {tuple(values.shape)} compressed values do not fit a ({rows}, {cols}) weight at {nm} "
            f"(expected {expected})"
        )
    mask = unpack_nm_mask(parts["bitmask"], (rows, cols), nm, what)
    dense = torch.zeros(rows, cols, dtype=values.dtype)
    return dense.masked_scatter_(mask, values)


def compressed_nbytes(shape: tuple[int, int], nm: NM, dtype: torch.dtype) -> int:
    """Bytes of the three stored tensors of a compressed (out, in) weight."""
    rows, cols = shape
    itemsize = torch.empty((), dtype=dtype).element_size()
    return rows * cols * nm.n // nm.m * itemsize + rows * ((cols + 7) // 8) + 2 * 8
