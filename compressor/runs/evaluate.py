"""`compressor eval`: the evaluation tasks (perplexity, harness tasks) of a model (a run's output folder, an HF
folder, a GGUF file, a hub name)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from compressor.config.base import StrictModel, input_paths
from compressor.eval.config import EvalConfig
from compressor.eval.runner import check_tasks_available, run_tasks
from compressor.models.config import ModelConfig
from compressor.runs.common import evaluate, eval_windows_for
from compressor.utils.env import environment_info
from compressor.utils.fs import atomic_write_json
from compressor.utils.run_folder import check_output_file
from compressor.utils.timing import PhaseTimer


class EvalRunConfig(StrictModel):
    model: ModelConfig = ModelConfig()
    evaluation: EvalConfig = EvalConfig()


def resolve_model_source(source: str) -> str:
    """A run's output folder holds its model in ``model/``: accept the run folder itself."""
    path = Path(source)
    if path.is_dir() and not (path / "config.json").exists() and (path / "model" / "config.json").exists():
        return str(path / "model")
    return source


def run_eval(cfg: EvalRunConfig, output: Optional[str | Path] = None, overwrite: bool = False) -> dict[str, Any]:
    from compressor.models import load_model

    check_tasks_available(cfg.evaluation)
    cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"source": resolve_model_source(cfg.model.source)})})
    if output is not None:
        check_output_file(output, overwrite, input_paths(cfg))
    timer = PhaseTimer()
    with timer.phase("load"):
        loaded = load_model(cfg.model)
    report: dict[str, Any] = {"model": cfg.model.source, "config": cfg.model_dump(mode="json")}
    with timer.phase("evaluate"):
        if cfg.evaluation.perplexity:
            windows, note = eval_windows_for(cfg.evaluation, loaded.tokenizer)
            report["perplexity"] = evaluate(loaded.model, windows, cfg.evaluation, note, "perplexity").as_dict()
        report["evaluation"] = run_tasks(loaded.model, loaded.tokenizer, cfg.evaluation, report.get("perplexity"))
    report.update(timing=timer.as_dict(), environment=environment_info())
    if output is not None:
        atomic_write_json(output, report)
    return report
