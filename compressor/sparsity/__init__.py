"""N:M sparsity primitives: pure tensor functions, no I/O, no models."""

from compressor.sparsity.nm import (
    NM,
    Unstructured,
    SparsityTarget,
    parse_sparsity,
    check_divisible,
    group_view,
    nm_mask_from_scores,
    unstructured_mask_from_scores,
    mask_from_scores,
    nm_violations,
    is_nm,
    assert_nm,
    density,
)
from compressor.sparsity.patterns import nm_patterns, pattern_index, patterns_to_mask
from compressor.sparsity.bitpack import PackedMasks, pack_bits, unpack_bits

__all__ = [
    "NM", "Unstructured", "SparsityTarget", "parse_sparsity", "check_divisible", "group_view",
    "nm_mask_from_scores", "unstructured_mask_from_scores", "mask_from_scores", "nm_violations",
    "is_nm", "assert_nm", "density", "nm_patterns", "pattern_index", "patterns_to_mask",
    "PackedMasks", "pack_bits", "unpack_bits",
]
