import numpy as np
import pytest

from compressor.search.evolution import (
    SelectionStage,
    check_stages,
    crossover,
    keep_best,
    level_switch,
    multi_step_selection,
    mutate,
    breed,
    seed_population,
    sensitivity_seed,
    stage_windows,
)
from compressor.search.levels import LevelSet, SearchSpace
from compressor.search.repair import repair
from tests.search.spaces import random_space

TRIALS = 300


def test_mutation_keeps_the_average_exactly():
    rng = np.random.default_rng(0)
    for _ in range(TRIALS):
        space, k = random_space(rng, layers=(8, 30))
        for _ in range(5):
            child = mutate(k, space, rng)
            assert space.is_exact(child) and space.average(child) == space.average(k)
            assert not np.array_equal(child, k)
            k = child


def test_mutation_says_so_when_no_other_candidate_has_the_average():
    # units 2, 3, 2 on three levels at budget 3 units: 2a + 3b + 2c = 3 has the one solution (0, 1, 0)
    shapes = {"a": (32, 8), "b": (48, 8), "c": (32, 8)}
    space = SearchSpace.build(shapes, LevelSet.nm(8, [6, 4, 2]), 0.25 + 0.25 * 3 / 7)
    only = np.array([0, 1, 0])
    assert space.is_exact(only)
    with pytest.raises(ValueError, match="no level switch keeps the average"):
        mutate(only, space, np.random.default_rng(0))


def test_mutation_never_modifies_its_input():
    rng = np.random.default_rng(1)
    space, k = random_space(rng)
    before = k.copy()
    for _ in range(50):
        mutate(k, space, rng)
    assert np.array_equal(k, before)


def test_level_switch_between_size_classes_pays_back_in_whole_steps():
    # q (4096 weights, unit 2) one level sparser pays for two k (2048, unit 1) steps back, or the reverse
    shapes = {"q": (64, 64), "k0": (32, 64), "k1": (32, 64)}
    space = SearchSpace.build(shapes, LevelSet.nm(8), 0.5)
    rng = np.random.default_rng(2)
    seen = set()
    for _ in range(200):
        k = np.array([3, 3, 3])
        child = level_switch(k, space, rng)
        if child is not None:
            assert space.is_exact(child)
            seen.add(tuple(child - k))
    assert seen <= {(1, -1, -1), (1, -2, 0), (1, 0, -2), (-1, 1, 1), (-1, 2, 0), (-1, 0, 2), (0, 1, -1), (0, -1, 1)}
    assert (1, -1, -1) in seen or (1, -2, 0) in seen  # sparsity moved from k to q


def test_sparsity_flows_between_attention_and_mlp():
    rng = np.random.default_rng(3)
    shapes = {f"model.layers.{b}.{r}": s for b in range(4)
              for r, s in [("q", (64, 64)), ("k", (32, 64)), ("gate", (128, 64)), ("down", (64, 128))]}
    space = SearchSpace.build(shapes, LevelSet.nm(8), 0.625)
    k = np.full(len(space), 4)
    mlp = np.array(["gate" in n or "down" in n for n in space.names])
    shares = set()
    for _ in range(100):
        k = mutate(k, space, rng)
        shares.add(int(np.dot(space.sizes[mlp], k[mlp])))
    assert len(shares) > 3 and space.is_exact(k)


def test_crossover_repairs_to_the_exact_average():
    rng = np.random.default_rng(4)
    for _ in range(TRIALS):
        space, a = random_space(rng)
        b = repair(rng.integers(0, len(space.levels), size=len(space)), space, rng)  # an unrelated parent
        child = crossover(a, b, space, rng)
        assert space.is_exact(child)


def test_children_are_distinct_exact_and_differ_from_the_parents():
    rng = np.random.default_rng(5)
    for _ in range(20):
        space, k = random_space(rng, layers=(20, 30))
        children = breed([k], space, rng, 16)
        assert len(children) == 16 and len({c.tobytes() for c in children}) == 16
        assert all(space.is_exact(c) and not np.array_equal(c, k) for c in children)
        population = children[:4]
        crossed = breed(population, space, rng, 12, crossover_rate=0.8)
        assert all(space.is_exact(c) for c in crossed)
        assert not {c.tobytes() for c in crossed} & {p.tobytes() for p in population}


def test_sensitivity_seed_gives_sensitive_layers_lower_sparsity_at_the_exact_average():
    rng = np.random.default_rng(6)
    for _ in range(100):
        space, _ = random_space(rng, layers=(5, 30))
        sensitivity = np.exp(rng.normal(scale=3.0, size=len(space)))  # traces span orders of magnitude
        try:
            seed = sensitivity_seed(space, sensitivity, spread=0.1)
        except ValueError:  # the target too near 0 or 1 for this spread
            continue
        assert space.is_exact(seed)
        for idx in space.size_classes().values():  # within a size class, ordered by sensitivity
            order = idx[np.argsort(sensitivity[idx])]
            assert (np.diff(seed[order]) <= 0).all()


def test_seed_population_is_the_seed_and_distinct_perturbed_copies():
    rng = np.random.default_rng(7)
    space, k = random_space(rng, layers=(20, 30))
    population = seed_population(space, k, 8, rng)
    assert np.array_equal(population[0], k) and len({p.tobytes() for p in population}) == 8
    assert all(space.is_exact(p) for p in population)
    assert len(seed_population(space, k, 1, rng)) == 1  # EvoPress's single parent: no copies


def test_keep_best_is_stable_and_ranks_nan_last():
    cands = [np.array([i]) for i in range(5)]
    kept, fit = keep_best(cands, [3.0, float("nan"), 1.0, 1.0, 0.5], 3)
    assert [int(c[0]) for c in kept] == [4, 2, 3] and fit == [0.5, 1.0, 1.0]
    with pytest.raises(ValueError, match="5 candidates but 2"):
        keep_best(cands, [1.0, 2.0], 1)


def test_multi_step_selection_stages_tokens_and_elitism():
    stages = [SelectionStage(4, 512), SelectionStage(2, 2048), SelectionStage(1, 8192)]
    children = [np.array([i]) for i in range(10)]
    parent = np.array([99])
    calls = []

    def score(pool, index, stage):
        calls.append((index, stage.tokens, sorted(int(c[0]) for c in pool)))
        # the true fitness is |c - 6|; the first stage's few tokens see it with a bias towards small c
        return [abs(int(c[0]) - 6) + (0.1 * int(c[0]) if index == 0 else 0.0) for c in pool]

    result = multi_step_selection(children, [parent], stages, score)
    assert [c[:2] for c in calls] == [(0, 512), (1, 2048), (2, 8192)]
    assert len(calls[0][2]) == 10 and len(calls[1][2]) == 4 and 99 in calls[2][2]  # parent joins last
    assert int(result.best[0]) == 6 and result.fitness == [0.0]
    assert result.evaluations == 10 + 4 + 3 and result.tokens == 10 * 512 + 4 * 2048 + 3 * 8192
    # a parent that no child beats stays; a population-sized last stage keeps the best few
    elite = multi_step_selection(children[:5], [np.array([6])], stages, lambda p, i, s: [abs(int(c[0]) - 6) for c in p])
    assert int(elite.best[0]) == 6
    stages = [SelectionStage(6, 512), SelectionStage(3, 1024)]
    kept = multi_step_selection(children, [np.array([5]), np.array([20])], stages,
                                lambda p, i, s: [abs(int(c[0]) - 6) for c in p])
    assert sorted(int(c[0]) for c in kept.survivors) == [5, 6, 7]  # the elite 5 duplicates a child once


def test_stage_checks():
    check_stages([SelectionStage(8, 256), SelectionStage(1, 1024)])
    for bad in [[], [SelectionStage(0, 10)], [SelectionStage(4, 100), SelectionStage(4, 200), SelectionStage(1, 300)],
                [SelectionStage(4, 200), SelectionStage(1, 100)]]:
        with pytest.raises(ValueError):
            check_stages(bad)


def test_stage_windows_hold_the_token_budget_in_distinct_windows():
    rng = np.random.default_rng(8)
    picks = stage_windows(rng, 64, 512, 1300)
    assert [t for _, t in picks] == [512, 512, 276] and len({w for w, _ in picks}) == 3
    assert all(0 <= w < 64 for w, _ in picks)
    with pytest.raises(ValueError, match="do not fit"):
        stage_windows(rng, 2, 512, 1025)
