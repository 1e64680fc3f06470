"""The generation loop of an evolutionary search, checkpointed after every generation.

A generation: ``breed`` children from the population, ``multi_step_selection`` on stages of growing
token budgets (each stage's windows drawn from the search's own generator), the survivors become the
population. The checkpoint (``checkpoints/tree.py``: JSON + safetensors, written atomically) holds the
population, the generator's state, the counts and the history, so a killed search resumes at the
generation after the last finished one and ends with the plan an uninterrupted run would: every random
draw comes from that one generator and a candidate's fitness on given windows is deterministic.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from compressor.checkpoints.tree import load_tree, save_tree, tree_exists
from compressor.errors import ConfigError
from compressor.search.config import EvolutionConfig
from compressor.search.evolution import SelectionStage, breed, multi_step_selection, stage_windows
from compressor.search.levels import Candidate, SearchSpace
from compressor.search.scoring import Pick, Scorer
from compressor.utils.logging import get_logger

log = get_logger(__name__)


@dataclass
class SearchState:
    population: list[Candidate]
    rng_state: dict[str, Any]
    generation: int = 0
    evaluations: int = 0
    tokens: int = 0
    seconds: float = 0.0
    history: list[dict[str, Any]] = field(default_factory=list)  # one row per generation

    def to_tree(self) -> dict[str, Any]:
        # plain lists, no tensors: the JSON file alone is the checkpoint, replaced in one atomic rename (a kill
        # between writing a tree's tensors and its JSON would pair one generation's population with another's rng)
        return {"population": [p.tolist() for p in self.population], "rng_state": self.rng_state,
                "generation": self.generation, "evaluations": self.evaluations, "tokens": self.tokens,
                "seconds": self.seconds, "history": self.history}

    @classmethod
    def from_tree(cls, tree: dict[str, Any]) -> "SearchState":
        population = [np.asarray(row, dtype=np.int64) for row in tree["population"]]
        return cls(population, tree["rng_state"], tree["generation"], tree["evaluations"], tree["tokens"],
                   tree["seconds"], tree["history"])


def evolve(name: str, space: SearchSpace, population: list[Candidate], rng: np.random.Generator, scorer: Scorer,
           cfg: EvolutionConfig, fixed: list[Pick], checkpoint: Path,
           on_generation: Optional[Callable[[str, int], None]] = None) -> SearchState:
    """Run (or continue, from ``checkpoint``) ``cfg.generations`` generations; the final population's first
    member is the best. ``fixed``: the windows each generation's best is also scored on, for a history
    that is comparable across generations and searches (not counted in ``evaluations``)."""
    if tree_exists(checkpoint):
        state = SearchState.from_tree(load_tree(checkpoint))
        rng.bit_generator.state = state.rng_state
        log.info("%s: resumed after generation %d (%d evaluations)", name, state.generation, state.evaluations)
        if state.generation > cfg.generations:
            raise ConfigError(f"{name}: the checkpoint {checkpoint} is at generation {state.generation}, past "
                              f"evolution.generations={cfg.generations}; ask for at least {state.generation}")
    else:
        state = SearchState([np.asarray(p, dtype=np.int64) for p in population], rng.bit_generator.state)
    stages = cfg.selection

    def score(pool: list[Candidate], index: int, stage: SelectionStage) -> list[float]:
        picks = stage_windows(rng, scorer.num_windows, scorer.seq_len - 1, stage.tokens)
        return scorer.score(pool, picks)

    while state.generation < cfg.generations:
        start = time.perf_counter()
        children = breed(state.population, space, rng, cfg.offspring, cfg.crossover_rate, cfg.max_switches)
        result = multi_step_selection(children, state.population, stages, score)
        best = result.best
        tracked = scorer.score_fixed([best], fixed)[0]
        state.population = result.survivors
        state.generation += 1
        state.evaluations += result.evaluations
        state.tokens += result.tokens
        state.seconds += time.perf_counter() - start
        state.rng_state = rng.bit_generator.state
        state.history.append({"generation": state.generation, "evaluations": state.evaluations,
                              "tokens": state.tokens, "stage_fitness": result.fitness[0], "fitness": tracked,
                              "seconds": round(state.seconds, 3)})
        save_tree(checkpoint, state.to_tree())
        log.info("%s: generation %d/%d, fitness %.5f (fixed windows %.5f), %d evaluations, %.1f s", name,
                 state.generation, cfg.generations, result.fitness[0], tracked, state.evaluations, state.seconds)
        if on_generation is not None:
            on_generation(name, state.generation)
    return state
