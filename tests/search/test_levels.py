from fractions import Fraction

import numpy as np
import pytest

from compressor.search.levels import LevelSet, SearchSpace, linear_allocation
from compressor.sparsity import NM, Unstructured
from compressor.sparsity.plan import PlanError, SparsityPlan
from tests.search.spaces import random_space


def test_level_sets():
    assert LevelSet.nm(8).levels == tuple(NM(n, 8) for n in range(7, 0, -1))
    assert LevelSet.nm(4).describe() == "{3:4, 2:4, 1:4}"
    fractions = LevelSet.unstructured(0.3, 0.9, 0.05)
    assert len(fractions) == 13 and fractions.levels[1] == Unstructured(0.35)
    assert fractions.levels[-1] == Unstructured(0.9)
    assert fractions.step == Fraction(1, 20) and fractions.group == 1
    assert LevelSet.parse(["2:4", "1:4", "3:4"]) == LevelSet.nm(4)
    for bad in [["2:4", "4:8"], ["2:4", 0.5], [0.3, 0.4, 0.6], ["2:4", "2:4"]]:
        with pytest.raises(ValueError):
            LevelSet.parse(bad)
    with pytest.raises(ValueError, match="whole number of steps"):
        LevelSet.unstructured(0.3, 0.9, 0.07)


SHAPES = {"q": (64, 64), "k": (32, 64), "gate": (128, 64), "down": (64, 128)}  # units 2, 1, 4, 4


def test_space_budget_and_average_are_exact():
    space = SearchSpace.build(SHAPES, LevelSet.nm(8), 0.625)  # 5:8 everywhere is index 4
    uniform = np.full(4, 4)
    assert space.is_exact(uniform) and space.average(uniform) == Fraction(5, 8) and space.unit == 2048
    moved = np.array([3, 6, 4, 4])  # q one step less sparse (4096), k two steps more (2 * 2048)
    assert space.is_exact(moved)
    plan = space.to_plan(moved)
    assert plan.target == 0.625 and plan.resolve(SHAPES).average == Fraction(5, 8)
    assert list(space.from_levels(plan.resolve(SHAPES).levels)) == list(moved)


def test_space_rejects_unreachable_targets_and_bad_widths():
    with pytest.raises(PlanError, match="outside"):
        SearchSpace.build(SHAPES, LevelSet.nm(4), 0.8)
    # with units of 2048 weights x 1/8, averages move in steps of 256 / 22528; 0.6 is 5.6 weights off the nearest
    with pytest.raises(PlanError, match="nearest misses it"):
        SearchSpace.build(SHAPES, LevelSet.nm(8), 0.6)
    with pytest.raises(PlanError, match="k: input width 60"):
        SearchSpace.build({**SHAPES, "k": (32, 60)}, LevelSet.nm(8), 0.625)


def test_linear_allocation_keeps_the_weighted_average():
    rng = np.random.default_rng(2)
    for _ in range(100):
        n = int(rng.integers(2, 20))
        values, sizes = rng.normal(size=n), rng.integers(1, 10, size=n)
        s = linear_allocation(values, sizes, 0.6, 0.1)
        assert np.dot(sizes, s) / sizes.sum() == pytest.approx(0.6, abs=1e-12)
        assert s.max() - s.min() == pytest.approx(0.2)
        assert (np.diff(s[np.argsort(values)]) <= 1e-12).all()  # higher value, lower sparsity
    assert list(linear_allocation([1.0, 1.0], [1, 3], 0.5, 0.1)) == [0.5, 0.5]
    with pytest.raises(ValueError, match="leave"):
        linear_allocation([0.0, 1.0], [1, 1], 0.95, 0.1)


def test_plan_of_a_candidate_reloads_to_the_same_levels(tmp_path):
    rng = np.random.default_rng(3)
    for i in range(20):
        space, k = random_space(rng)
        shapes = {n: (int(p) // 8, 8) for n, p in zip(space.names, space.sizes)}
        path = space.to_plan(k).save(tmp_path / f"p{i}.yaml")
        resolved = SparsityPlan.load(path, shapes).resolve(shapes)  # declared target checked on load
        assert list(space.from_levels(resolved.levels)) == list(k) and resolved.average == space.average(k)
