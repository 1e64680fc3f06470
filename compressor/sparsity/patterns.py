"""The C(M, N) keep-patterns of an N:M group, and conversion between masks and pattern indices."""

from __future__ import annotations

import itertools
from functools import lru_cache

import torch

from compressor.errors import SparsityPatternError
from compressor.sparsity.nm import NM, group_view

# Pattern indices go through a lookup table of size 2**M.
_MAX_M = 16


@lru_cache(maxsize=None)
def _combinations(n: int, m: int) -> tuple[tuple[int, ...], ...]:
    return tuple(itertools.combinations(range(m), n))


def nm_patterns(nm: NM, device: torch.device | str | None = None) -> torch.Tensor:
    """(C(M, N), M) bool: every way to keep exactly N of M, in lexicographic order of kept positions."""
    combos = _combinations(nm.n, nm.m)
    patterns = torch.zeros(len(combos), nm.m, dtype=torch.bool)
    for row, kept in enumerate(combos):
        patterns[row, list(kept)] = True
    return patterns.to(device) if device is not None else patterns


def _code_table(nm: NM) -> torch.Tensor:
    """(2**M,) long: bit-code of a group -> its pattern index, or -1 if it keeps != N weights."""
    if nm.m > _MAX_M:
        raise ValueError(f"pattern indices support M <= {_MAX_M}, got {nm}")
    table = torch.full((1 << nm.m,), -1, dtype=torch.long)
    for index, kept in enumerate(_combinations(nm.n, nm.m)):
        table[sum(1 << k for k in kept)] = index
    return table


def pattern_index(mask: torch.Tensor, nm: NM) -> torch.Tensor:
    """(..., K) bool mask with exactly N kept per group -> (..., K // M) long pattern indices."""
    groups = group_view(mask.bool(), nm.m)  # (..., G, M)
    weights = 1 << torch.arange(nm.m, device=mask.device)
    codes = (groups.long() * weights).sum(dim=-1)  # (..., G)
    index = _code_table(nm).to(mask.device)[codes]
    if (index < 0).any():
        bad = int((index < 0).sum())
        raise SparsityPatternError(
            f"{bad} groups do not keep exactly {nm.n} of {nm.m}; a pattern index needs an exact {nm} mask"
        )
    return index


def patterns_to_mask(index: torch.Tensor, nm: NM) -> torch.Tensor:
    """(..., G) long pattern indices -> (..., G * M) bool mask."""
    groups = nm_patterns(nm, index.device)[index]  # (..., G, M)
    return groups.reshape(*index.shape[:-1], index.shape[-1] * nm.m)
