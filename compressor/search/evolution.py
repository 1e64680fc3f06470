"""Evolutionary search over per-layer levels at an exact average (EvoPress-style), as pure functions.

Candidates are level-index arrays of a ``SearchSpace``; every operator returns a new candidate whose
budget sum_l p_l * k_l is unchanged (so its parameter-weighted average stays exactly at the target).

Mutation (``level_switch``): EvoPress moves one layer a level down and another a level up. In its level
database every level step removes the same number of weights in every layer, so that swap keeps the
total. Here a level is a fixed pattern (e.g. 3:8) whose step removes p_l * step weights, different per
layer, so a one-for-one swap is exact only between layers of equal parameter count. Between size classes
of units a and b (p / gcd) the smallest exact exchange is b / gcd(a, b) steps up spread over the first
class and a / gcd(a, b) steps down over the second: for SmolLM2 (units 1, 3, 8 for k/v, q/o and MLP) a
q_proj one level sparser pays for three k/v level steps back. We draw the pair of layers uniformly and
make the exchange their classes need, so most moves are plain swaps within a class (those classes hold
most layers) and sparsity still flows between attention and MLP.

Crossover takes each layer's level from one parent or the other and repairs (``repair.repair``); ``breed``
makes a generation's children from a population (one parent without crossover is EvoPress).
Seeding maps Fisher sensitivities linearly to sparsities (``linear_allocation``: the most sensitive layer
lowest), snaps them to the level set at the exact average, and adds mutated copies.
Selection runs in stages on growing token budgets, as EvoPress's multi-step selection.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np

from compressor.search.levels import Candidate, SearchSpace, linear_allocation
from compressor.search.repair import repair, snap


def level_switch(c: Candidate, space: SearchSpace, rng: np.random.Generator) -> Optional[Candidate]:
    """One exact exchange: a random layer gets sparser, another less sparse, and their size classes pay
    each other back in whole level steps. None if the classes lack the room (the caller draws again)."""
    c, top = np.asarray(c, dtype=np.int64), len(space.levels) - 1
    can_up, can_down = np.flatnonzero(c < top), np.flatnonzero(c > 0)
    if not len(can_up) or not len(can_down):
        return None
    i, j = int(rng.choice(can_up)), int(rng.choice(can_down))
    if i == j:
        return None
    a, b = int(space.sizes[i]), int(space.sizes[j])
    g = math.gcd(a, b)
    out = c.copy()
    if not (_steps(out, space, i, b // g, +1, rng) and _steps(out, space, j, a // g, -1, rng)):
        return None
    return out


def _steps(k: np.ndarray, space: SearchSpace, first: int, count: int, sign: int, rng: np.random.Generator) -> bool:
    """``count`` level steps in direction ``sign``: the first at layer ``first``, the rest at random layers
    of its size class that still have room (in place). False if the class runs out of room."""
    top = len(space.levels) - 1
    same = np.flatnonzero(space.sizes == space.sizes[first])
    k[first] += sign
    for _ in range(count - 1):
        room = same[(k[same] < top) if sign > 0 else (k[same] > 0)]
        if not len(room):
            return False
        k[int(rng.choice(room))] += sign
    return True


def mutate(c: Candidate, space: SearchSpace, rng: np.random.Generator, max_switches: int = 3) -> Candidate:
    """A different candidate, 1 .. ``max_switches`` level switches away (fewer more likely: the minimum of
    two uniform draws, as in EvoPress). Raises if no switch is possible at all."""
    switches = min(rng.integers(1, max_switches + 1), rng.integers(1, max_switches + 1))
    c = np.asarray(c, dtype=np.int64)
    out, done = c, 0
    for _ in range(100 * max_switches):
        moved = level_switch(out, space, rng)
        if moved is not None:
            out, done = moved, done + 1
            if done >= switches and not np.array_equal(out, c):  # switches can undo each other
                return out
    raise ValueError(f"no level switch keeps the average of {c.tolist()}: a single level, or no room")


def crossover(a: Candidate, b: Candidate, space: SearchSpace, rng: np.random.Generator) -> Candidate:
    """Each layer's level from ``a`` or ``b`` at random, repaired back to the exact budget."""
    child = np.where(rng.random(len(space)) < 0.5, a, b)
    return repair(child, space, rng)


def breed(population: Sequence[Candidate], space: SearchSpace, rng: np.random.Generator, count: int,
          crossover_rate: float = 0.0, max_switches: int = 3, max_tries: int = 1000) -> list[Candidate]:
    """``count`` distinct children, none equal to a member of ``population``: each a mutant of a random
    member, or with probability ``crossover_rate`` (and two or more members) of the crossover of two.
    One parent and no crossover is EvoPress's (1 + lambda) step. Fewer only if the space is that small."""
    population = [np.asarray(p, dtype=np.int64) for p in population]
    seen, out = {p.tobytes() for p in population}, []
    for _ in range(max_tries if count > 0 else 0):  # count 0: a population of one is just its seed
        if len(population) > 1 and rng.random() < crossover_rate:
            i, j = rng.choice(len(population), size=2, replace=False)
            parent = crossover(population[i], population[j], space, rng)
        else:
            parent = population[int(rng.integers(len(population)))]
        child = mutate(parent, space, rng, max_switches)
        if child.tobytes() not in seen:
            seen.add(child.tobytes())
            out.append(child)
            if len(out) == count:
                break
    return out


def sensitivity_seed(space: SearchSpace, sensitivity: Sequence[float], spread: float) -> Candidate:
    """More sensitive layers (higher Fisher trace per weight) get lower sparsity: log-sensitivities mapped
    linearly onto sparsities of width 2 * ``spread`` around the target (log, since traces span orders of
    magnitude), then snapped to the level set at the exact average."""
    log_s = np.log(np.maximum(np.asarray(sensitivity, dtype=np.float64), np.finfo(np.float64).tiny))
    sparsities = linear_allocation(log_s, space.sizes, float(space.target), spread)
    return snap(space.level_positions(sparsities), space)


def seed_population(space: SearchSpace, seed: Candidate, size: int, rng: np.random.Generator,
                    max_switches: int = 3) -> list[Candidate]:
    """``seed`` plus ``size - 1`` distinct mutated copies of it (the perturbed copies of MSP's start)."""
    return [seed.copy()] + breed([seed], space, rng, size - 1, max_switches=max_switches)


@dataclass(frozen=True)
class SelectionStage:
    survivors: int  # candidates kept after this stage
    tokens: int  # calibration tokens each candidate is scored on in this stage


@dataclass(frozen=True)
class SelectionResult:
    survivors: list[Candidate]  # the last stage's, best first
    fitness: list[float]  # their fitness at the last stage
    evaluations: int  # candidate scorings made, over all stages
    tokens: int  # candidate-tokens scored, over all stages

    @property
    def best(self) -> Candidate:
        return self.survivors[0]


Scorer = Callable[[list[Candidate], int, SelectionStage], list[float]]  # (candidates, stage index, stage)


def check_stages(stages: Sequence[SelectionStage]) -> None:
    if not stages or min(s.survivors for s in stages) < 1:
        raise ValueError("selection needs stages, each keeping at least 1 survivor")
    for a, b in zip(stages, stages[1:]):
        if not (b.survivors < a.survivors and b.tokens >= a.tokens):
            raise ValueError(f"stages must keep fewer candidates on as many tokens or more: {a} then {b}")


def keep_best(candidates: list[Candidate], fitness: Sequence[float], keep: int) -> tuple[list[Candidate], list[float]]:
    """The ``keep`` lowest-fitness candidates (lower is better), ties in their order; NaN ranks last."""
    f = np.asarray(fitness, dtype=np.float64)
    if f.shape != (len(candidates),):
        raise ValueError(f"{len(candidates)} candidates but {f.size} fitness values")
    order = np.argsort(np.where(np.isnan(f), np.inf, f), kind="stable")[:keep]
    return [candidates[i] for i in order], [float(f[i]) for i in order]


def multi_step_selection(children: list[Candidate], elites: Sequence[Candidate], stages: Sequence[SelectionStage],
                         score: Scorer) -> SelectionResult:
    """Score ``children`` on the first stage's tokens, keep the best, score the survivors on more tokens,
    and so on; ``elites`` (the current parent, or population) join at the last stage, so a generation never
    gets worse on the same tokens. The last stage's survivors are the next parents (1 for EvoPress).
    ``score`` is the only impure part (it runs the model, e.g. as Ray tasks)."""
    check_stages(stages)
    pool, evaluations, tokens = list(children), 0, 0
    fitness: list[float] = []
    for index, stage in enumerate(stages):
        if index == len(stages) - 1:
            pool += [e for e in elites if not any(np.array_equal(e, p) for p in pool)]
        fitness = list(score(pool, index, stage))
        evaluations, tokens = evaluations + len(pool), tokens + len(pool) * stage.tokens
        pool, fitness = keep_best(pool, fitness, stage.survivors)
    return SelectionResult(pool, fitness, evaluations, tokens)


def stage_windows(rng: np.random.Generator, num_windows: int, window_length: int, tokens: int) -> list[tuple[int, int]]:
    """Distinct random windows holding ``tokens`` tokens in all, as (window index, tokens used from its
    start); the last one cut short. Draw once per stage, so every candidate of a stage sees the same tokens."""
    if tokens > num_windows * window_length or tokens < 1:
        raise ValueError(f"{tokens} tokens do not fit in {num_windows} windows of {window_length}")
    need = -(-tokens // window_length)
    chosen = rng.choice(num_windows, size=need, replace=False)
    return [(int(w), min(window_length, tokens - n * window_length)) for n, w in enumerate(chosen)]
