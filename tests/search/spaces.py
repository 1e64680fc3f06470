"""Random search spaces for property tests: layers of a few size classes, a level set, and a target that
is reachable by construction (the average of a random candidate)."""

from __future__ import annotations

from fractions import Fraction

import numpy as np

from compressor.search.levels import LevelSet, SearchSpace

LEVEL_SETS = [LevelSet.nm(8), LevelSet.nm(4), LevelSet.nm(8, [6, 4, 2]), LevelSet.unstructured(0.3, 0.9, 0.05)]
UNIT_SETS = [(1, 3, 8), (1,), (2, 3), (4, 6, 9), (1, 2, 5, 7)]  # (1, 3, 8): SmolLM2's k/v, q/o, MLP


def random_space(rng: np.random.Generator, layers: tuple[int, int] = (3, 30),
                 level_sets: list[LevelSet] = LEVEL_SETS) -> tuple[SearchSpace, np.ndarray]:
    """A space and one exact candidate of it."""
    levels = level_sets[rng.integers(len(level_sets))]
    units = UNIT_SETS[rng.integers(len(UNIT_SETS))]
    n = int(rng.integers(*layers))
    unit_of = rng.choice(units, size=n)
    shapes = {f"model.layers.{i // 7}.l{i}": (16 * int(u), 8) for i, u in enumerate(unit_of)}
    k0 = rng.integers(0, len(levels), size=n).astype(np.int64)
    sizes = np.array([o * i for o, i in shapes.values()])
    average = levels.first + levels.step * Fraction(int(np.dot(sizes, k0)), int(sizes.sum()))
    space = SearchSpace.build(shapes, levels, average)
    assert space.budget == space.budget_of(k0)
    return space, k0
