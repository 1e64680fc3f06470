"""`compressor prune`: one-shot N:M (or unstructured) pruning of a causal LM, block by block."""

from __future__ import annotations

import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional

import torch
from pydantic import field_validator, model_validator

from compressor.calibration.config import CalibrationConfig
from compressor.checkpoints.masks import save_masks
from compressor.config.base import InputPath, SparsityField, StrictModel, input_paths
from compressor.eval.config import EvalConfig
from compressor.eval.runner import check_tasks_available, run_tasks
from compressor.execution.base import ExecutorConfig, make_executor
from compressor.methods.registry import (
    MagnitudeOptions, SparseGPTOptions, SparseSwapsOptions, WandaOptions, get_method, registered_name, section_options,
)
from compressor.models.checks import assert_finite_weights
from compressor.models.config import ModelConfig
from compressor.models.layers import block_prefix, decoder_blocks, prunable_linears
from compressor.pipelines.block_store import BlockStore
from compressor.precision import DTYPES, Precision, log_precision
from compressor.pipelines.sequential import OneShotPlan, prune_sequential
from compressor.reporting.markdown import prune_report_markdown
from compressor.reporting.plots import evaluation_plots, plot_layer_errors
from compressor.reporting.summary import mean_by_type, mean_of, weighted_density
from compressor.sparsity import NM, is_nm
from compressor.runs.plans import PLAN_FILE, record_plan, resolve_plan, setup_plan, uniform_text, weight_levels
from compressor.sparsity.plan import SparsityPlan
from compressor.runs.common import evaluate, eval_windows_for, finish_report, save_or_check_config
from compressor.utils.fs import atomic_dir
from compressor.utils.run_folder import run_folder
from compressor.utils.logging import get_logger
from compressor.utils.timing import PhaseTimer

log = get_logger(__name__)


class PruneConfig(StrictModel):
    model: ModelConfig = ModelConfig()
    sparsity: Optional[SparsityField] = NM(2, 4)  # None exactly when sparsity_plan is given
    # a per-layer (mixed) plan file, YAML or JSON (compressor/sparsity/plan.py); exclusive with sparsity
    sparsity_plan: Optional[InputPath] = None
    method: str = "wanda"  # a registered one-shot method (compressor.methods.registry.METHODS)
    magnitude: MagnitudeOptions = MagnitudeOptions()
    wanda: WandaOptions = WandaOptions()
    sparsegpt: SparseGPTOptions = SparseGPTOptions()
    sparseswaps: SparseSwapsOptions = SparseSwapsOptions()
    targets: list[str] = [".*"]  # regexes over linear names (full match), e.g. ".*mlp.*"
    ignore: list[str] = []
    calibration: CalibrationConfig = CalibrationConfig()
    evaluation: EvalConfig = EvalConfig()
    executor: ExecutorConfig = ExecutorConfig()
    precision: Precision = Precision()  # bfloat16: calibration passes on the bf16 matrix units
    layer_error: bool = True  # report each layer's error against the dense model's inputs
    save_model: bool = True

    @model_validator(mode="before")
    @classmethod
    def _plan_replaces_sparsity(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("sparsity_plan") is not None:
            if data.get("sparsity") is not None:
                raise ValueError(f"give sparsity ({data['sparsity']!r}) or sparsity_plan ({data['sparsity_plan']!r}), "
                                 "not both: the plan holds every layer's level")
            data = {**data, "sparsity": None}
        return data

    @model_validator(mode="after")
    def _check(self) -> "PruneConfig":
        if self.sparsity is None and self.sparsity_plan is None:
            raise ValueError("sparsity is empty: give a level such as \"2:4\" or 0.5, or a sparsity_plan file")
        return self

    @field_validator("method")
    @classmethod
    def _registered(cls, name: str) -> str:
        return registered_name(name)

    @property
    def method_options(self) -> Any:
        """The method's options: its section of this config (``sparsegpt: {damp: ...}``), or the defaults
        of its options model for a registered method that has no section here."""
        return section_options(self, self.method)


class LazyWalk:
    """Weights read one decoder block at a time, written to the output as soon as the block is done
    (``model_dir`` None: only read, e.g. for a prior's masks; nothing is written).

    Resident are one block and, until block 0's inputs are captured, the embedding: the final norm and
    the LM head are never read by pruning, and ``finish`` copies the unchanged outer tensors from the
    source folder one at a time. The source files are closed after each read (``WeightStore.close``).
    """

    def __init__(self, loaded, model_dir: Optional[Path], dtype: torch.dtype) -> None:
        from compressor.checkpoints.streaming import StreamingHFWriter
        from compressor.models.lazy import WeightStore, materialize, rebuild_rotary

        self.loaded, self.dtype = loaded, dtype
        self.store = WeightStore(loaded.folder)
        embed = loaded.arch.embed_tokens
        materialize(loaded.model.get_submodule(embed), embed, self.store, dtype)
        self.store.close()
        rebuild_rotary(loaded.model, loaded.arch)
        self.writer = StreamingHFWriter(model_dir) if model_dir is not None else None

    def _block(self, k: int):
        return decoder_blocks(self.loaded.model, self.loaded.arch)[k], block_prefix(self.loaded.arch, k)

    def inputs_captured(self) -> None:
        from compressor.models.lazy import release

        release(self.loaded.model.get_submodule(self.loaded.arch.embed_tokens))

    def load_block(self, k: int) -> None:
        from compressor.models.lazy import materialize

        block, prefix = self._block(k)
        materialize(block, prefix, self.store, self.dtype)
        self.store.close()
        assert_finite_weights(block, prefix)

    def save_block(self, k: int) -> None:
        from compressor.models.lazy import release

        block, prefix = self._block(k)
        if self.writer is not None:
            self.writer.write(f"block-{k:05d}", {f"{prefix}.{n}": t for n, t in block.state_dict().items()})
        release(block)

    def finish(self) -> None:
        model, arch = self.loaded.model, self.loaded.arch
        names = [n for n in model.state_dict() if not n.startswith(f"{arch.blocks}.")]
        tied = bool(getattr(model.config, "tie_word_embeddings", False))
        if tied:
            names = [n for n in names if n != f"{arch.lm_head}.weight"]
        for i, name in enumerate(names):  # one tensor at a time: an LM head can be a large part of the model
            self.writer.write(f"outer-{i:03d}", {name: self.store.get(name, self.dtype)})
            self.store.close()
        self.writer.finish(model.config, self.loaded.tokenizer, getattr(model, "generation_config", None), replace=True)


def run_prune(cfg: PruneConfig, output: str | Path, overwrite: bool = False, resume: bool = False) -> dict[str, Any]:
    """Prune into the run folder ``output`` (see ``compressor.utils.run_folder`` for the folder policy)."""
    check_tasks_available(cfg.evaluation)
    if cfg.sparsity_plan is not None:
        SparsityPlan.load(cfg.sparsity_plan)  # the file's own checks, before any folder is made
    with run_folder(output, "prune", input_paths(cfg), overwrite, resume) as folder:
        save_or_check_config(folder.path, cfg, resuming=folder.resumed)
        setup_plan(folder.path, cfg.sparsity_plan, resuming=folder.resumed)
        return _prune(cfg, folder.path)


def _prune(cfg: PruneConfig, out: Path) -> dict[str, Any]:
    from compressor.data import calibration_windows, load_token_ids
    from compressor.models import load_model

    timer = PhaseTimer()
    with timer.phase("load"):
        loaded = load_model(cfg.model, empty=cfg.model.lazy)
        lazy = LazyWalk(loaded, out / "model", DTYPES[cfg.model.dtype]) if cfg.model.lazy else None
        assert_finite_weights(loaded.model)
    model, tokenizer = loaded.model, loaded.tokenizer
    resolved = None
    if cfg.sparsity_plan is not None:  # checked against the model before any work
        resolved = resolve_plan(cfg.sparsity_plan, prunable_linears(model, loaded.arch, cfg.targets, cfg.ignore))
    report: dict[str, Any] = {
        "method": cfg.method,
        "sparsity": str(cfg.sparsity) if resolved is None else "mixed",
        "model": {"source": cfg.model.source, "folder": str(loaded.folder), "family": loaded.arch.family,
                  "parameters": sum(p.numel() for p in model.parameters())},
        "config": cfg.model_dump(mode="json"),
        "precision": cfg.precision.describe(),
    }

    eval_windows = note = None
    if cfg.evaluation.enabled and lazy is not None:
        log.info("model.lazy: evaluation is skipped (the model is never whole in memory); "
                 "run `compressor eval` on the output where it fits")
    elif cfg.evaluation.enabled:
        if cfg.evaluation.perplexity:
            with timer.phase("data"):
                eval_windows, note = eval_windows_for(cfg.evaluation, tokenizer)
        if cfg.evaluation.dense_baseline:
            with timer.phase("evaluate"):
                if eval_windows is not None:
                    report["dense_perplexity"] = evaluate(model, eval_windows, cfg.evaluation, note, "dense").as_dict()
                report["dense_evaluation"] = run_tasks(model, tokenizer, cfg.evaluation, report.get("dense_perplexity"))

    needs_data = get_method(cfg.method).stats != "none" or cfg.layer_error
    with timer.phase("data"):
        if needs_data:
            c = cfg.calibration
            windows = calibration_windows(load_token_ids(c.data, tokenizer), c.num_windows, c.seq_len, c.seed)
        else:
            windows = torch.empty(0, cfg.calibration.seq_len, dtype=torch.long)

    plan = OneShotPlan(cfg.method, cfg.sparsity, cfg.method_options, cfg.sparsegpt, tuple(cfg.targets),
                       tuple(cfg.ignore), cfg.calibration.batch_size, cfg.layer_error, cfg.precision,
                       levels=None if resolved is None else resolved.levels)
    log_precision(cfg.precision, "prune")
    work = out / ".work" / "blocks"
    with make_executor(cfg.executor) as executor:
        outcome = prune_sequential(model, loaded.arch, windows, plan, executor, BlockStore(work), timer,
                                   on_block_start=lazy.load_block if lazy else None,
                                   on_block_done=lazy.save_block if lazy else None,
                                   on_inputs_captured=lazy.inputs_captured if lazy else None)
        report["executor"] = executor.describe()  # where the jobs ran (Ray: tasks per node)
    if outcome.resumed_blocks:
        log.info("resumed: %d finished blocks loaded from %s", outcome.resumed_blocks, work)

    layers = [asdict(r) for r in outcome.layers]
    report["layers"] = layers
    report["summary"] = {
        "linears": len(layers),
        "density": weighted_density(layers),
        # prune_sequential already raised if a weight broke the pattern; this records the final masks' check
        "pattern_ok": _pattern_ok(outcome.masks, plan),
        "mean_layer_error": mean_of(layers, "error"),
        "error_by_type": mean_by_type(layers, "error"),
        "mean_warm_start_error": mean_of(layers, "warm_start_error"),
        "warm_start_error_by_type": mean_by_type(layers, "warm_start_error") or None,
        "resumed_blocks": outcome.resumed_blocks,
    }

    with timer.phase("save"):
        if resolved is None:
            save_masks(out / "masks.safetensors", outcome.masks, str(cfg.sparsity))
        else:
            save_masks(out / "masks.safetensors", outcome.masks, uniform_text(resolved), weight_levels(resolved))
        if lazy is not None:
            lazy.finish()
        elif cfg.save_model:
            with atomic_dir(out / "model", replace=True) as tmp:
                model.save_pretrained(tmp)
                tokenizer.save_pretrained(tmp)
    if eval_windows is not None:
        with timer.phase("evaluate"):
            report["perplexity"] = evaluate(model, eval_windows, cfg.evaluation, note, "pruned").as_dict()
    if cfg.evaluation.enabled and lazy is None:
        with timer.phase("evaluate"):
            report["evaluation"] = run_tasks(model, tokenizer, cfg.evaluation, report.get("perplexity"))

    plots = []
    if cfg.layer_error and layers:
        keys = ("error", "warm_start_error") if report["summary"]["mean_warm_start_error"] is not None else ("error",)
        plots.append(plot_layer_errors(layers, out / "plots" / "layer_error.png",
                                       f"{plan.describe()}: layer error vs dense inputs", keys).relative_to(out))
    if resolved is not None:
        plots += record_plan(out, resolved, cfg.sparsity_plan, report, f"{plan.describe()}: sparsity per layer")
    plots += evaluation_plots(out, report)
    report["outputs"] = {"model": "model" if cfg.save_model else None, "masks": "masks.safetensors",
                         "plots": [str(p) for p in plots]}
    if resolved is not None:
        report["outputs"]["plan"] = PLAN_FILE
    times = timer.as_dict()
    report["timing"] = {**times, "prune_seconds": round(times.get("calibrate", 0.0) + times.get("solve", 0.0), 3)}
    report = finish_report(out, report, prune_report_markdown, timer)
    shutil.rmtree(out / ".work", ignore_errors=True)
    return report


def _pattern_ok(masks: dict[str, torch.Tensor], plan: OneShotPlan) -> Optional[bool]:
    """Every N:M layer's final mask against its own level; None when no layer is N:M."""
    levels = {f"{n}.weight": lv for n, lv in plan.levels.items()} if plan.levels else dict.fromkeys(masks, plan.sparsity)
    nm = {n: lv for n, lv in levels.items() if isinstance(lv, NM)}
    return all(is_nm(masks[n], lv) for n, lv in nm.items()) if nm else None

