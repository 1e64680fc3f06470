import itertools
from fractions import Fraction

import numpy as np
import pytest

from compressor.search.levels import LevelSet, SearchSpace
from compressor.search.repair import RepairError, repair, snap
from tests.search.spaces import random_space

TRIALS = 300


def test_repair_reaches_the_exact_budget_from_anywhere():
    rng = np.random.default_rng(0)
    for _ in range(TRIALS):
        space, _ = random_space(rng)
        start = rng.integers(-1, len(space.levels) + 1, size=len(space))  # also out of range
        fixed = repair(start, space, rng)
        assert space.is_exact(fixed), (space.sizes, start)


def test_repair_changes_as_few_steps_as_brute_force():
    rng = np.random.default_rng(1)
    small = [LevelSet.nm(4), LevelSet.nm(8, [6, 4, 2]), LevelSet.unstructured(0.5, 0.8, 0.1)]
    for _ in range(60):
        space, _ = random_space(rng, layers=(2, 6), level_sets=small)
        start = rng.integers(0, len(space.levels), size=len(space))
        every = (np.array(c) for c in itertools.product(range(len(space.levels)), repeat=len(space)))
        fewest = min(int(np.abs(c - start).sum()) for c in every if space.is_exact(c))
        assert int(np.abs(repair(start, space, rng) - start).sum()) == fewest


def test_repair_says_why_when_no_levels_reach_the_budget():
    # sizes 4, 4, 6 (units 2, 2, 3) on two levels: budgets 0, 4, 6, 8, 10, 14 -- never 2
    space = SearchSpace.build({"a": (1, 4), "b": (1, 4), "c": (1, 6)}, LevelSet.parse([0.25, 0.5]), Fraction(2, 7))
    assert space.budget == 2
    with pytest.raises(RepairError, match="cannot reach the exact average: 1 size units"):
        repair(np.zeros(3, dtype=np.int64), space)


def test_snap_rounds_by_largest_remainder_at_the_exact_budget():
    space = SearchSpace.build({f"l{i}": (8, 8) for i in range(4)}, LevelSet.nm(8), 0.5)  # sum of indices = 12
    assert list(snap(np.array([3.0, 3.0, 3.0, 3.0]), space)) == [3, 3, 3, 3]
    assert list(snap(np.array([2.4, 2.6, 3.3, 3.7]), space)) == [2, 3, 3, 4]
    assert list(snap(np.array([2.4, 2.45, 2.5, 2.6]), space)) == [3, 3, 3, 3]  # +2 steps needed beyond rounding
    assert list(snap(np.array([0.2, 0.6, 6.6, 6.9]), space)) == [0, 0, 6, 6]  # clipped to the top level first
