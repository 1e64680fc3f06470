"""`compressor eval`: the evaluation tasks (perplexity, harness tasks) of a model (a run's output folder, an HF
folder, a GGUF file, a hub name)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch

from compressor.config.base import StrictModel, input_paths
from compressor.eval.config import EvalConfig
from compressor.eval.runner import check_tasks_available, run_tasks
from compressor.models.config import ModelConfig
from compressor.runs.common import evaluate, eval_windows_for, memory_record
from compressor.utils.env import environment_info
from compressor.utils.fs import atomic_write_json
from compressor.utils.run_folder import check_output_file
from compressor.utils.timing import PhaseTimer


class EvalRunConfig(StrictModel):
    model: ModelConfig = ModelConfig()
    evaluation: EvalConfig = EvalConfig()


def resolve_model_source(source: str) -> tuple[str, Optional[Path]]:
    """A run's output folder holds its model in ``model/``: accept the run folder itself. Returns the
    model source and the run's ``masks.safetensors``, if any: a `compressor launch` run's ``model/`` is
    the dense base model, and applying a run's masks to a model that is already masked changes nothing."""
    path = Path(source)
    if path.is_dir() and not (path / "config.json").exists() and (path / "model" / "config.json").exists():
        masks = path / "masks.safetensors"
        return str(path / "model"), masks if masks.is_file() else None
    return source, None


def apply_run_masks(model: torch.nn.Module, path: Path) -> int:
    """W <- W * mask for every mask in ``path``; a mask naming no weight of the model is an error."""
    from compressor.checkpoints.masks import load_masks
    from compressor.errors import CheckpointError

    params = dict(model.named_parameters())
    masks = load_masks(path)
    for name, mask in masks.items():
        weight = params.get(name)
        if weight is None or weight.shape != mask.shape:
            raise CheckpointError(f"{path}: mask {name} {tuple(mask.shape)} fits no weight of the model in "
                                  f"{path.parent / 'model'}")
        with torch.no_grad():
            weight.mul_(mask.to(weight.dtype))
    return len(masks)


def run_eval(cfg: EvalRunConfig, output: Optional[str | Path] = None, overwrite: bool = False) -> dict[str, Any]:
    from compressor.models import load_model

    check_tasks_available(cfg.evaluation)
    source, masks = resolve_model_source(cfg.model.source)
    cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"source": source})})
    if output is not None:
        check_output_file(output, overwrite, input_paths(cfg))
    timer = PhaseTimer()
    with timer.phase("load"):
        loaded = load_model(cfg.model)
        applied = apply_run_masks(loaded.model, masks) if masks is not None else 0
    report: dict[str, Any] = {"model": cfg.model.source, "config": cfg.model_dump(mode="json")}
    if masks is not None:
        report["masks"] = {"path": str(masks), "applied": applied}
    with timer.phase("evaluate"):
        if cfg.evaluation.perplexity:
            windows, note = eval_windows_for(cfg.evaluation, loaded.tokenizer)
            report["perplexity"] = evaluate(loaded.model, windows, cfg.evaluation, note, "perplexity").as_dict()
        report["evaluation"] = run_tasks(loaded.model, loaded.tokenizer, cfg.evaluation, report.get("perplexity"))
    report.update(timing=timer.as_dict(), environment=environment_info(), memory=memory_record(timer))
    if output is not None:
        atomic_write_json(output, report)
    return report
