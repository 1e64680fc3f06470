"""The final evaluation of a run: every task of ``evaluation.tasks`` on the model the run holds in memory.

Perplexity is computed by the run itself (it also draws the training curve of mask learning), so its
result is passed in; the harness tasks run here, in ``evaluation.dtype``.
"""

from __future__ import annotations

import time
from typing import Any, Mapping, Optional

from compressor.eval.config import EvalConfig
from compressor.eval.tasks import TASKS, Metric, TaskResult
from compressor.utils.logging import get_logger

log = get_logger(__name__)


def check_tasks_available(cfg: EvalConfig) -> None:
    """Fail before a run starts, not after it, when a package its tasks need is missing."""
    specs = cfg.harness_specs
    if specs:
        from compressor.eval.harness import require_harness

        require_harness()
    if any(s.offline for s in specs):
        from compressor.eval.olmo_data import olmo_root

        olmo_root()


def perplexity_result(ppl: Mapping[str, Any]) -> TaskResult:
    """A run's perplexity dict (PerplexityResult.as_dict) as a task result."""
    return TaskResult("perplexity", TASKS["perplexity"].family,
                      {"perplexity": Metric(ppl["perplexity"], ppl.get("stderr"), False),
                       "nll": Metric(ppl["nll"], ppl.get("nll_stderr"), False)},
                      samples=ppl.get("windows"), note=ppl.get("note"),
                      extra={"window_length": ppl.get("window_length"), "tokens": ppl.get("tokens")})


def run_tasks(model, tokenizer, cfg: EvalConfig, perplexity: Optional[Mapping[str, Any]] = None) -> dict[str, Any]:
    """``{"tasks": {name: TaskResult dict}, "dtype", "seconds", "harness"}``, tasks in the config's order."""
    results: dict[str, TaskResult] = {}
    started = time.perf_counter()
    specs = cfg.harness_specs
    if specs:
        from compressor.eval.harness import harness_info, run_harness
        from compressor.eval.precision import eval_precision

        with eval_precision(model, cfg.dtype) as evaluated:
            results.update(run_harness(evaluated, tokenizer, specs, cfg.harness))
    if perplexity is not None and cfg.perplexity:
        results["perplexity"] = perplexity_result(perplexity)
    for result in results.values():
        log.info("%s: %s", result.task, format_metrics(result.metrics))
    order = [s.name for s in cfg.task_specs]
    return {"tasks": {n: results[n].as_dict() for n in order if n in results}, "dtype": cfg.dtype,
            "seconds": round(time.perf_counter() - started, 3), "harness": harness_info(cfg.harness) if specs else None}


def format_metrics(metrics: Mapping[str, Any]) -> str:
    """``acc 0.6123 ± 0.0114, acc_norm ...`` from Metric objects or their dicts."""
    parts = []
    for name, m in metrics.items():
        value, stderr = (m.value, m.stderr) if isinstance(m, Metric) else (m["value"], m.get("stderr"))
        parts.append(f"{name} {value:.4f}" + (f" ± {stderr:.4f}" if stderr is not None else ""))
    return ", ".join(parts)
