"""N:M sparsity targets and masks.

Convention used across the package: a linear weight has shape (out, in); N:M groups are M
consecutive weights along the *input* dimension, of which at most N are non-zero. Masks are
boolean tensors of the weight's shape, True = kept.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Union

import torch

from compressor.errors import NonFiniteError, SparsityPatternError


@dataclass(frozen=True)
class NM:
    """Keep at most ``n`` of every ``m`` consecutive weights along the input dimension."""

    n: int
    m: int

    def __post_init__(self) -> None:
        for field in ("n", "m"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"N:M sparsity: {field} must be an integer, got {value!r}")
        if not 1 <= self.n < self.m:
            raise ValueError(
                f"N:M sparsity {self.n}:{self.m} is impossible: need 1 <= N < M "
                "(N weights kept out of every M, e.g. 2:4)"
            )

    @classmethod
    def parse(cls, value: Any) -> "NM":
        """Accept an NM, the text ``"2:4"``, a pair ``(2, 4)`` or a mapping ``{n: 2, m: 4}``."""
        if isinstance(value, NM):
            return value
        if isinstance(value, str):
            parts = value.strip().split(":")
            if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
                raise ValueError(f"expected N:M such as '2:4', got {value!r}")
            return cls(int(parts[0]), int(parts[1]))
        if isinstance(value, (tuple, list)) and len(value) == 2:
            return cls(*value)
        if isinstance(value, dict) and set(value) == {"n", "m"}:
            return cls(value["n"], value["m"])
        raise ValueError(f"expected N:M such as '2:4', (2, 4) or {{n: 2, m: 4}}, got {value!r}")

    @property
    def density(self) -> float:
        return self.n / self.m

    @property
    def sparsity(self) -> float:
        return 1.0 - self.density

    def __str__(self) -> str:
        return f"{self.n}:{self.m}"

    @classmethod
    def __get_pydantic_core_schema__(cls, source: Any, handler: Any) -> Any:
        from pydantic_core import core_schema

        return core_schema.no_info_plain_validator_function(
            cls.parse, serialization=core_schema.plain_serializer_function_ser_schema(str)
        )


@dataclass(frozen=True)
class Unstructured:
    """Zero the given fraction of weights, anywhere."""

    sparsity: float

    def __post_init__(self) -> None:
        if isinstance(self.sparsity, bool) or not isinstance(self.sparsity, (int, float)):
            raise ValueError(f"unstructured sparsity must be a number, got {self.sparsity!r}")
        if not 0.0 < float(self.sparsity) < 1.0:
            raise ValueError(
                f"unstructured sparsity {self.sparsity} is impossible: give the pruned fraction, "
                "strictly between 0 and 1 (e.g. 0.5)"
            )

    @property
    def density(self) -> float:
        return 1.0 - self.sparsity

    def __str__(self) -> str:
        return f"unstructured {self.sparsity:g}"


SparsityTarget = Union[NM, Unstructured]


def parse_sparsity(value: Any) -> SparsityTarget:
    """``"2:4"``/``(2, 4)``/``{n, m}`` -> NM; a float such as ``0.5`` -> Unstructured."""
    if isinstance(value, (NM, Unstructured)):
        return value
    if isinstance(value, float) or (isinstance(value, int) and not isinstance(value, bool)):
        return Unstructured(float(value))
    return NM.parse(value)


def check_divisible(width: int, m: int, what: str = "tensor") -> None:
    if width % m:
        raise SparsityPatternError(
            f"{what}: input width {width} is not divisible by M={m}. N:M groups run along the "
            f"input dimension; choose an M that divides {width} or leave this layer out of the targets."
        )


def group_view(t: torch.Tensor, m: int, what: str = "tensor") -> torch.Tensor:
    """(..., k) -> (..., k // m, m): the N:M groups along the last dimension."""
    check_divisible(t.shape[-1], m, what)
    return t.reshape(*t.shape[:-1], t.shape[-1] // m, m)


def _check_finite(scores: torch.Tensor, what: str) -> None:
    if not torch.isfinite(scores).all():
        bad = int((~torch.isfinite(scores)).sum())
        raise NonFiniteError(f"{what}: {bad} scores are NaN or inf; check the weights and statistics")


def nm_mask_from_scores(scores: torch.Tensor, nm: NM, what: str = "scores") -> torch.Tensor:
    """Keep the ``n`` highest-scoring weights of every group of ``m``."""
    _check_finite(scores, what)
    groups = group_view(scores, nm.m, what)  # (..., G, m)
    keep = groups.topk(nm.n, dim=-1).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, keep, True)
    return mask.reshape(scores.shape)


def unstructured_mask_from_scores(
    scores: torch.Tensor, sparsity: float, scope: str = "row", what: str = "scores"
) -> torch.Tensor:
    """Prune the lowest-scoring fraction, compared within each row (``row``) or the whole tensor."""
    _check_finite(scores, what)
    if scope == "row":
        flat = scores.reshape(-1, scores.shape[-1])
    elif scope == "layer":
        flat = scores.reshape(1, -1)
    else:
        raise ValueError(f"scope must be 'row' or 'layer', got {scope!r}")
    n_prune = int(flat.shape[-1] * sparsity)
    mask = torch.ones_like(flat, dtype=torch.bool)
    if n_prune:
        drop = flat.topk(n_prune, dim=-1, largest=False).indices
        mask.scatter_(-1, drop, False)
    return mask.reshape(scores.shape)


def mask_from_scores(
    scores: torch.Tensor, target: SparsityTarget, scope: str = "row", what: str = "scores"
) -> torch.Tensor:
    if isinstance(target, NM):
        return nm_mask_from_scores(scores, target, what)
    return unstructured_mask_from_scores(scores, target.sparsity, scope, what)


def nm_violations(t: torch.Tensor, nm: NM) -> torch.Tensor:
    """Boolean (..., G): groups holding more than ``n`` non-zeros (``t`` may be a mask or weights)."""
    nonzero = group_view(t != 0, nm.m).sum(dim=-1)
    return nonzero > nm.n


def is_nm(t: torch.Tensor, nm: NM) -> bool:
    return t.shape[-1] % nm.m == 0 and not bool(nm_violations(t, nm).any())


def assert_nm(t: torch.Tensor, nm: NM, what: str = "tensor") -> None:
    bad = nm_violations(t, nm)
    if bad.any():
        first = [int(i) for i in bad.nonzero()[0]]
        raise SparsityPatternError(
            f"{what}: {int(bad.sum())} of {bad.numel()} groups break the {nm} pattern "
            f"(more than {nm.n} non-zeros in {nm.m}); first at group index {first}"
        )


def density(t: torch.Tensor) -> float:
    """Fraction of non-zero entries (for a mask: fraction kept)."""
    return float((t != 0).sum()) / max(t.numel(), 1)
