"""What to evaluate: the tasks (perplexity over held-out windows, BENCHMARK.md: wiki.test.raw, 512, and
lm-evaluation-harness tasks), their data and the precision they run in."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, PositiveInt, field_validator

from compressor.config.base import StrictModel
from compressor.data.config import DatasetConfig
from compressor.eval.tasks import TaskSpec, resolve_tasks


class HarnessConfig(StrictModel):
    """How lm-evaluation-harness tasks run (ignored when only perplexity is asked for)."""

    limit: Optional[PositiveInt] = None  # a quick variant: the first documents of each task (reported as such)
    batch_size: PositiveInt = 8
    max_gen_toks: Optional[PositiveInt] = None  # cap generated tokens (default: each task's own)
    max_length: Optional[PositiveInt] = None  # context window in tokens, longer prompts lose their start (default: the model's)
    bootstrap_iters: int = Field(100000, ge=0)  # the harness's default; stderr of non-mean metrics (LAMBADA ppl)


class EvalConfig(StrictModel):
    enabled: bool = True
    # task names and suites of compressor.eval.tasks (README: Evaluation tasks); hf:<task> for stock harness tasks
    tasks: list[str] = Field(["perplexity"], min_length=1)
    data: DatasetConfig = DatasetConfig(split="eval")  # the perplexity text
    seq_len: PositiveInt = 512
    max_windows: Optional[PositiveInt] = None  # a quick variant: only the first windows (reported as such)
    batch_size: PositiveInt = 4
    dense_baseline: bool = False  # also evaluate the model before pruning
    # The precision every task runs in: the protocol evaluates in float32 whatever the step ran in.
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    harness: HarnessConfig = HarnessConfig()

    @field_validator("tasks")
    @classmethod
    def _known_tasks(cls, names: list[str]) -> list[str]:
        resolve_tasks(names)  # raises, naming the unknown task and the known ones
        return names

    @property
    def task_specs(self) -> list[TaskSpec]:
        return resolve_tasks(self.tasks)

    @property
    def perplexity(self) -> bool:
        """Whether the windows-based perplexity is asked for."""
        return self.enabled and any(s.name == "perplexity" for s in self.task_specs)

    @property
    def harness_specs(self) -> list[TaskSpec]:
        return [s for s in self.task_specs if s.harness is not None] if self.enabled else []
