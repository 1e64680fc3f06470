"""`compressor search`: the typed config, validated at load (levels, target and stages checked together)."""

from __future__ import annotations

from fractions import Fraction
from typing import Any, Literal, Optional, Union

from pydantic import Field, NonNegativeInt, PositiveInt, field_validator, model_validator

from compressor.calibration.config import CalibrationConfig
from compressor.config.base import StrictModel
from compressor.eval.config import EvalConfig
from compressor.execution.base import ExecutorConfig
from compressor.methods.registry import (
    MagnitudeOptions, SparseGPTOptions, SparseSwapsOptions, WandaOptions, registered_name, section_options,
)
from compressor.models.config import ModelConfig
from compressor.precision import Precision
from compressor.search.evolution import SelectionStage, check_stages
from compressor.search.levels import LevelSet
from compressor.search.owl import OWL_LAMBDAS, OWL_MS

SearchName = Literal["msp", "evopress", "owl", "uniform"]


class LevelRange(StrictModel):
    """Unstructured levels start, start + step, ..., stop (inclusive)."""

    start: float = Field(gt=0, lt=1)
    stop: float = Field(gt=0, lt=1)
    step: float = Field(gt=0, lt=1)


class FisherConfig(StrictModel):
    num_windows: PositiveInt = 32  # the first calibration windows; per-sequence gradients
    batch_size: PositiveInt = 1
    spread: float = Field(0.1, gt=0, lt=0.5)  # the seed's sparsities span target +- spread


class StageConfig(StrictModel):
    tokens: PositiveInt  # predicted tokens each candidate is scored on in this stage
    survivors: PositiveInt


class EvolutionConfig(StrictModel):
    generations: PositiveInt = 40
    offspring: PositiveInt = 16  # children per generation
    # EvoPress's multi-step selection; the last stage's survivors are the population (1: EvoPress's (1 + lambda))
    stages: list[StageConfig] = Field(default_factory=lambda: [StageConfig(tokens=1022, survivors=4),
                                                               StageConfig(tokens=4088, survivors=2),
                                                               StageConfig(tokens=8176, survivors=1)],
                                      min_length=1)
    crossover_rate: float = Field(0.0, ge=0, le=1)
    max_switches: PositiveInt = 3  # level switches per mutation, at most

    @property
    def selection(self) -> list[SelectionStage]:
        return [SelectionStage(s.survivors, s.tokens) for s in self.stages]

    @model_validator(mode="after")
    def _stages(self) -> "EvolutionConfig":
        try:
            check_stages(self.selection)
        except ValueError as e:
            raise ValueError(f"evolution.stages: {e}") from None
        return self


class FitnessConfig(StrictModel):
    """Candidates are scored on windows of the calibration data (never the evaluation file), drawn with
    their own seed (BENCHMARK.md: 64 windows of 512, seed 1)."""

    kind: Literal["kl", "ppl"] = "kl"
    num_windows: PositiveInt = 64
    seq_len: PositiveInt = 512
    seed: NonNegativeInt = 1
    windows_per_job: PositiveInt = 2  # one executor job scores one candidate on this many windows
    # every plan's final fitness (and each search's curve) on the first N windows, all their tokens
    final_windows: Optional[PositiveInt] = 16
    batch_size: PositiveInt = 2  # windows per forward pass inside a job


class OwlConfig(StrictModel):
    ms: list[float] = Field(default_factory=lambda: list(OWL_MS), min_length=1)  # outlier thresholds M
    lambdas: list[float] = Field(default_factory=lambda: list(OWL_LAMBDAS), min_length=1)


class SearchConfig(StrictModel):
    model: ModelConfig = ModelConfig()
    method: str = "sparsegpt"  # a registered one-shot method (compressor.methods.registry.METHODS)
    magnitude: MagnitudeOptions = MagnitudeOptions()
    wanda: WandaOptions = WandaOptions()
    sparsegpt: SparseGPTOptions = SparseGPTOptions()
    sparseswaps: SparseSwapsOptions = SparseSwapsOptions()
    # "1:8".."6:8", 0.3..: one kind, equally spaced; or {start, stop, step} for unstructured fractions
    levels: Union[LevelRange, list[Union[str, float]]]
    target: float = Field(gt=0, lt=1)  # parameter-weighted average sparsity of every plan
    # one run of each evolutionary search per seed (the database and Fisher traces are shared)
    seeds: list[NonNegativeInt] = Field(default_factory=lambda: [0], min_length=1)
    targets: list[str] = [".*"]
    ignore: list[str] = []
    calibration: CalibrationConfig = CalibrationConfig()  # the level database's statistics and Fisher's windows
    fisher: FisherConfig = FisherConfig()
    evolution: EvolutionConfig = EvolutionConfig()
    fitness: FitnessConfig = FitnessConfig()
    owl: OwlConfig = OwlConfig()
    searches: list[SearchName] = Field(default_factory=lambda: ["uniform", "owl", "evopress", "msp"], min_length=1)
    evaluation: EvalConfig = EvalConfig(enabled=False)  # `--evaluate`: perplexity of every plan
    executor: ExecutorConfig = ExecutorConfig()
    precision: Precision = Precision()

    @property
    def method_options(self) -> Any:
        return section_options(self, self.method)

    @field_validator("method")
    @classmethod
    def _registered(cls, name: str) -> str:
        return registered_name(name)

    @property
    def level_set(self) -> LevelSet:
        if isinstance(self.levels, LevelRange):
            return LevelSet.unstructured(self.levels.start, self.levels.stop, self.levels.step)
        return LevelSet.parse(self.levels)

    @field_validator("searches", "seeds")
    @classmethod
    def _distinct(cls, values: list) -> list:
        if len(set(values)) != len(values):
            raise ValueError(f"each value at most once, got {values}")
        return values

    @model_validator(mode="after")
    def _consistent(self) -> "SearchConfig":
        try:
            levels = self.level_set
        except ValueError as e:
            raise ValueError(f"levels: {e}") from None
        if len(levels) < 2:
            raise ValueError(f"levels: a search needs at least two levels, got {levels.describe()}")
        lo, hi = levels.sparsity(0), levels.sparsity(len(levels) - 1)
        if not lo <= Fraction(str(self.target)) <= hi:
            raise ValueError(f"target {self.target} lies outside the level set {levels.describe()}, whose "
                             f"sparsities span [{float(lo)}, {float(hi)}]")
        if self.model.lazy:
            raise ValueError("model.lazy: a search assembles whole candidate models, so the model must fit in memory")
        f = self.fitness
        room = f.num_windows * (f.seq_len - 1)
        for s in self.evolution.stages:
            if s.tokens > room:
                raise ValueError(f"evolution.stages: {s.tokens} tokens do not fit in fitness.num_windows="
                                 f"{f.num_windows} windows of {f.seq_len - 1} predicted tokens")
        if f.final_windows is not None and f.final_windows > f.num_windows:
            raise ValueError(f"fitness.final_windows={f.final_windows} exceeds fitness.num_windows={f.num_windows}")
        if self.evaluation.enabled and [t for t in self.evaluation.tasks if t != "perplexity"]:
            raise ValueError("evaluation.tasks: a search evaluates perplexity only")
        ev, cal = self.evaluation.data, self.calibration.data
        builtin_split = lambda d: (d.split or "train") if d.source.startswith("builtin:") else None  # noqa: E731
        if self.evaluation.enabled and ev.source == cal.source and builtin_split(ev) == builtin_split(cal):
            raise ValueError("evaluation.data.source is the calibration data: candidates must never be scored "
                             "or tuned on the evaluation text")
        if "msp" in self.searches and levels.step and self.fisher.spread < float(levels.step) / 2:
            raise ValueError(f"fisher.spread={self.fisher.spread} is below half a level step "
                             f"({float(levels.step)}): the Fisher seed would be uniform")
        return self

    @property
    def final_windows(self) -> int:
        return self.fitness.final_windows or self.fitness.num_windows
