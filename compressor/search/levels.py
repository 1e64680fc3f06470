"""Level sets and the search space: candidates as level indices, and the exact-average bookkeeping.

A level set is an *equally spaced* ladder of sparsities, s_k = s_0 + k * step (k = 0 .. K-1): unstructured
fractions such as 0.30, 0.35, ..., 0.90, or N:M patterns of one M such as 6:8, 5:8, ..., 1:8. Equal
spacing makes the pruned-weight count linear in the level index: a candidate k (one index per layer)
prunes sum_l p_l * (s_0 + k_l * step) weights, p_l = out * in. So its average sparsity is exactly the
target iff the integer

    budget(k) = sum_l p_l * k_l

equals one fixed integer, and every operator in ``evolution.py`` keeps that sum exact in integer
arithmetic. Since every budget is a multiple of g = gcd(p_l), the space's target budget is the multiple of
g nearest to the ideal one; if even that misses the target by more than one group of M weights (the
tolerance of ``compressor.sparsity.plan``), the target is unreachable and building the space says so.
Whether some candidate attains that budget within the level range is found by ``repair`` (it says so
when none does, which happens only next to the ends of the level set).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Mapping, Optional, Sequence

import numpy as np

from compressor.sparsity.nm import NM, SparsityTarget, Unstructured, parse_sparsity
from compressor.sparsity.plan import PlanError, SparsityPlan, group_size, level_sparsity

Candidate = np.ndarray  # (layers,) int64 level indices; operators never modify their inputs


@dataclass(frozen=True)
class LevelSet:
    levels: tuple[SparsityTarget, ...]  # increasing sparsity, equally spaced

    def __post_init__(self) -> None:
        if not self.levels:
            raise ValueError("a level set needs at least one level")
        kinds = {type(lv) for lv in self.levels}
        if len(kinds) > 1 or (NM in kinds and len({lv.m for lv in self.levels}) > 1):
            raise ValueError(f"a level set is all unstructured or all N:M of one M, got {self.describe()}")
        s = [level_sparsity(lv) for lv in self.levels]
        if any(b <= a for a, b in zip(s, s[1:])):
            raise ValueError(f"levels must be given in increasing sparsity without repeats, got {self.describe()}")
        if len({b - a for a, b in zip(s, s[1:])}) > 1:
            raise ValueError(f"levels must be equally spaced (the exact-average moves need it), got {self.describe()}")

    @classmethod
    def parse(cls, values: Sequence) -> "LevelSet":
        """From config values ("1:8", 0.3, ...) in any order: sorted by increasing sparsity."""
        levels = [parse_sparsity(v) for v in values]
        return cls(tuple(sorted(levels, key=level_sparsity)))

    @classmethod
    def unstructured(cls, lo: float, hi: float, step: float) -> "LevelSet":
        """lo, lo + step, ..., hi (inclusive), computed in decimals so 0.3 + 0.05 is 0.35, not 0.35000000000000003."""
        lo_f, hi_f, step_f = (Fraction(str(x)) for x in (lo, hi, step))
        count = (hi_f - lo_f) / step_f
        if step_f <= 0 or count.denominator != 1:
            raise ValueError(f"({hi} - {lo}) must be a whole number of steps of {step}")
        return cls(tuple(Unstructured(float(lo_f + k * step_f)) for k in range(int(count) + 1)))

    @classmethod
    def nm(cls, m: int, ns: Optional[Sequence[int]] = None) -> "LevelSet":
        """N:M levels of one M, by increasing sparsity; ``ns`` defaults to every N from M-1 down to 1."""
        ns = sorted(ns if ns is not None else range(1, m), reverse=True)
        return cls(tuple(NM(n, m) for n in ns))

    def __len__(self) -> int:
        return len(self.levels)

    @property
    def first(self) -> Fraction:
        return level_sparsity(self.levels[0])

    @property
    def step(self) -> Fraction:
        return level_sparsity(self.levels[1]) - self.first if len(self.levels) > 1 else Fraction(0)

    @property
    def group(self) -> int:
        return group_size(self.levels[0])

    def sparsity(self, k: int) -> Fraction:
        return self.first + k * self.step

    def describe(self) -> str:
        return "{" + ", ".join(str(lv) for lv in self.levels) + "}"


@dataclass(frozen=True, eq=False)  # eq=False: comparing the sizes arrays field by field would raise
class SearchSpace:
    """Layers (names, parameter counts) x a level set, with the budget that pins the average at the target."""

    names: tuple[str, ...]
    sizes: np.ndarray  # (layers,) int64 parameter counts out * in
    levels: LevelSet
    target: Fraction
    budget: int  # sum_l sizes[l] * k_l of every candidate on the target

    @classmethod
    def build(cls, shapes: Mapping[str, tuple[int, int]], levels: LevelSet, target: float | Fraction) -> "SearchSpace":
        """Check that every level fits every layer and that ``target`` (a decimal such as 0.7, taken as
        written, or an exact Fraction) is reachable (see the module docstring)."""
        if not shapes:
            raise PlanError("a search space needs at least one layer")
        if len(levels) < 2:
            raise ValueError(f"a search needs at least two levels, got {levels.describe()}")
        for name, (_, width) in shapes.items():
            if width % levels.group:
                raise PlanError(f"{name}: input width {width} is not divisible by M={levels.group} of the levels "
                                f"{levels.describe()}")
        sizes = np.array([o * i for o, i in shapes.values()], dtype=np.int64)
        goal = Fraction(str(target))
        ideal = (goal - levels.first) * int(sizes.sum()) / levels.step  # the budget of an exact average
        g = math.gcd(*sizes.tolist())
        budget = round(ideal / g) * g
        top = (len(levels) - 1) * int(sizes.sum())
        missed = abs(budget - ideal) * levels.step  # in weights
        if not 0 <= budget <= top or missed > levels.group:
            lo, hi = levels.sparsity(0), levels.sparsity(len(levels) - 1)
            raise PlanError(
                f"target sparsity {target} is not reachable with levels {levels.describe()} on these layers: "
                + (f"it lies outside [{float(lo)}, {float(hi)}]" if not 0 <= budget <= top else
                   f"averages move in steps of {float(g * levels.step / int(sizes.sum())):.3g}, the nearest misses "
                   f"it by {float(missed):.1f} weights (more than one group of M={levels.group})"))
        return cls(tuple(shapes), sizes, levels, goal, int(budget))

    def __len__(self) -> int:
        return len(self.names)

    @property
    def unit(self) -> int:
        """gcd of the layer sizes: every budget, and every budget change, is a multiple of it."""
        return math.gcd(*self.sizes.tolist())

    def budget_of(self, c: Candidate) -> int:
        return int(np.dot(self.sizes, np.asarray(c, dtype=np.int64)))

    def is_exact(self, c: Candidate) -> bool:
        return self.budget_of(c) == self.budget and bool(((0 <= c) & (c < len(self.levels))).all())

    def average(self, c: Candidate) -> Fraction:
        """Parameter-weighted average sparsity of a candidate, exact."""
        return self.levels.first + self.levels.step * Fraction(self.budget_of(c), int(self.sizes.sum()))

    def size_classes(self) -> dict[int, np.ndarray]:
        """Layer indices grouped by parameter count: the layers a one-for-one swap may exchange."""
        return {int(p): np.flatnonzero(self.sizes == p) for p in np.unique(self.sizes)}

    def to_levels(self, c: Candidate) -> dict[str, SparsityTarget]:
        return {n: self.levels.levels[int(k)] for n, k in zip(self.names, c)}

    def to_plan(self, c: Candidate) -> SparsityPlan:
        """The candidate as a plan file's content, its target declared (so loading re-checks the average)."""
        return SparsityPlan.from_levels(self.to_levels(c), target=float(self.target))

    def from_levels(self, levels: Mapping[str, SparsityTarget]) -> Candidate:
        index = {lv: k for k, lv in enumerate(self.levels.levels)}
        try:
            return np.array([index[levels[n]] for n in self.names], dtype=np.int64)
        except KeyError as e:
            raise PlanError(f"{e.args[0]} is not one of the levels {self.levels.describe()} or not a layer") from None

    def level_positions(self, sparsities: Sequence[float]) -> np.ndarray:
        """Continuous level positions (s - s_0) / step of per-layer sparsities, for snapping."""
        return (np.asarray(sparsities, dtype=np.float64) - float(self.levels.first)) / float(self.levels.step)


def linear_allocation(values: Sequence[float], sizes: Sequence[int], target: float, spread: float) -> np.ndarray:
    """Sparsities that fall linearly with ``values`` over a range of width 2 * ``spread``, shifted so that
    their parameter-weighted average is ``target``: the highest value gets the lowest sparsity. This is
    OWL's map (outlier ratio -> sparsity) and the Fisher seed's (sensitivity -> sparsity). The range is
    [target - spread, target + spread] exactly when the weighted mean of the values sits mid-range."""
    v, p = np.asarray(values, dtype=np.float64), np.asarray(sizes, dtype=np.float64)
    if v.shape != p.shape or v.ndim != 1 or not np.isfinite(v).all():
        raise ValueError("values and sizes must be finite 1-d arrays of the same length")
    width = v.max() - v.min()
    z = (v - v.min()) / width if width > 0 else np.zeros_like(v)  # 0 .. 1
    s = -2.0 * spread * z
    s += target - np.dot(p, s) / p.sum()
    if s.min() <= 0 or s.max() >= 1:
        raise ValueError(f"sparsities {s.min():.3f} .. {s.max():.3f} leave (0, 1): lower the spread {spread}")
    return s
