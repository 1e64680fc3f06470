"""`compressor learn`: MaskLLM mask learning, single process or DeepSpeed ranks, resumable.

Rank 0 owns the output folder: checkpoints under ``checkpoints/``, and at the end the hard masks,
the logits (for transfer), the masked model, the report and its plots.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

import torch

from compressor.checkpoints.logits import load_logits, save_logits
from compressor.checkpoints.masks import load_masks, save_masks
from compressor.config.base import input_paths
from compressor.errors import ConfigError
from compressor.execution.base import InProcessExecutor
from compressor.methods.maskllm import (
    attach_masks, mask_memory_bytes, prior_agreement, remove_masks, store_frozen_weights,
)
from compressor.methods.maskllm.gumbel import hard_mask
from compressor.methods.registry import STATS_NEEDED
from compressor.models.checks import assert_finite_weights
from compressor.models.layers import prunable_linears
from compressor.pipelines.sequential import OneShotPlan, prune_sequential
from compressor.precision import log_precision
from compressor.eval.runner import check_tasks_available, run_tasks
from compressor.reporting.markdown import learn_report_markdown
from compressor.reporting.plots import evaluation_plots, plot_lines
from compressor.reporting.tensorboard import TENSORBOARD_DIR, ScalarWriter
from compressor.runs.common import evaluate, eval_windows_for, finish_report, save_or_check_config
from compressor.training.backends import Backend, DeepSpeedBackend, SingleProcessBackend
from compressor.training.config import LearnConfig
from compressor.training.loop import backend_grad_accum, gathered_logits, train_masks
from compressor.utils.fs import atomic_dir
from compressor.utils.run_folder import run_folder
from compressor.utils.logging import get_logger, setup_logging
from compressor.utils.timing import PhaseTimer

log = get_logger(__name__)


def prior_masks(cfg: LearnConfig, names: list[str]) -> Optional[dict[str, torch.Tensor]]:
    """Masks to start the logits from (weight names -> bool), or None for random logits."""
    prior = cfg.prior
    if prior.kind == "none":
        return None
    if prior.kind == "file":
        path = Path(prior.path)
        path = path / "masks.safetensors" if path.is_dir() else path
        masks = load_masks(path)
    else:
        from compressor.data import calibration_windows, load_token_ids
        from compressor.models import load_model

        # A separate copy of the model: the one-shot pipeline writes pruned weights, ours stay dense.
        loaded = load_model(cfg.model)
        c = prior.calibration
        windows = calibration_windows(load_token_ids(c.data, loaded.tokenizer), c.num_windows, c.seq_len, c.seed)
        options = {"sparsegpt": prior.sparsegpt, "sparseswaps": prior.sparseswaps}.get(prior.kind)
        plan = OneShotPlan(prior.kind, cfg.maskllm.sparsity, options, prior.sparsegpt, tuple(cfg.targets),
                           tuple(cfg.ignore), c.batch_size, layer_error=False, precision=cfg.precision)
        if STATS_NEEDED[prior.kind] == "none":
            windows = windows[:0]
        masks = prune_sequential(loaded.model, loaded.arch, windows, plan, InProcessExecutor()).masks
        del loaded
    missing = [n for n in names if n not in masks]
    if missing:
        raise ConfigError(f"the prior has no mask for {len(missing)} layers, e.g. {missing[0]}; "
                          "it was made for other targets or another model")
    return {n: masks[n] for n in names}


def make_stream(cfg: LearnConfig, tokenizer, rank: int, world_size: int):
    from compressor.data import WindowStream

    t = cfg.train
    return WindowStream(t.data, tokenizer, t.seq_len, rank=rank, world_size=world_size, seed=t.seed,
                        shuffle_buffer=t.shuffle_buffer)


def make_backend(cfg: LearnConfig) -> Backend:
    return DeepSpeedBackend(cfg.deepspeed) if cfg.backend == "deepspeed" else SingleProcessBackend()


def learn_rank(cfg: LearnConfig, output: str | Path) -> Optional[dict[str, Any]]:
    """Run on every rank (rank and world size come from the environment) in the run folder ``output``,
    already opened by ``run_learn``; rank 0 returns the report."""
    from compressor.models import load_model

    check_tasks_available(cfg.evaluation)
    backend = make_backend(cfg)
    out = Path(output)
    timer = PhaseTimer()
    torch.manual_seed(cfg.train.seed)
    with timer.phase("load"):
        loaded = load_model(cfg.model)
        assert_finite_weights(loaded.model)
    model, tokenizer = loaded.model, loaded.tokenizer
    names = [f"{t.name}.weight" for t in prunable_linears(model, loaded.arch, cfg.targets, cfg.ignore)]
    with timer.phase("prior"):
        priors = None if cfg.init_logits else prior_masks(cfg, names)
    masks = attach_masks(model, [n[: -len(".weight")] for n in names], cfg.maskllm, priors, seed=cfg.train.seed)
    if cfg.init_logits:
        _load_transfer_logits(masks, cfg.init_logits)
    agreement = prior_agreement(masks, priors) if priors is not None else None
    if agreement is not None:
        (log.warning if agreement < 0.99 else log.info)(
            "the initial hard mask keeps the prior's pattern in %.2f%% of groups%s", 100 * agreement,
            "; raise maskllm.prior_strength to start from the prior itself" if agreement < 0.99 else "")
    frozen_bf16 = cfg.precision.compute == "bfloat16" and not cfg.maskllm.train_weights
    if frozen_bf16:
        store_frozen_weights(model, masks, torch.bfloat16)
    log_precision(cfg.precision, "learn")
    memory = mask_memory_bytes(masks)  # before ZeRO-3 partitions the logits (their local numel drops)
    params = [{"params": [m.logits for m in masks.values()], "lr": cfg.maskllm.logits_lr}]
    if cfg.maskllm.train_weights:
        weights = [model.get_submodule(n).parametrizations.weight.original for n in masks]
        params.append({"params": weights, "lr": cfg.maskllm.weight_lr})
    backend.setup(model, params, backend_grad_accum(cfg.maskllm, cfg.train), cfg.train.micro_batch_size)
    stream = make_stream(cfg, tokenizer, backend.rank, backend.world_size)

    # Only rank 0 evaluates (the others wait for it at the next gradient all-reduce), except under ZeRO-3,
    # where a forward pass gathers parameters from every rank: all ranks evaluate the same windows.
    evaluate_fn = None
    if cfg.evaluation.enabled and (backend.is_main or backend.partitioned):
        eval_windows, note = eval_windows_for(cfg.evaluation, tokenizer)
        evaluate_fn = lambda: evaluate(model, eval_windows, cfg.evaluation, note, "hard mask").perplexity  # noqa: E731

    scalars = ScalarWriter(out / TENSORBOARD_DIR) if backend.is_main else None
    with timer.phase("train"):
        history = train_masks(model, masks, cfg.maskllm, cfg.train, stream, backend, out / "checkpoints", evaluate_fn,
                              scalars=scalars, precision=cfg.precision)
    if scalars is not None:
        scalars.close()
    if not (backend.is_main or backend.partitioned):  # under ZeRO-3 every rank takes part in the gathers below
        backend.close()
        return None

    report: dict[str, Any] = {"method": "maskllm", "sparsity": str(cfg.maskllm.sparsity), "model": {"source": cfg.model.source},
                              "config": cfg.model_dump(mode="json"), "precision": cfg.precision.describe(),
                              "backend": cfg.backend, "world_size": backend.world_size,
                              "history": {"logs": history.logs, "evals": history.evals},
                              "memory_per_masked_weight": memory, "prior_agreement": agreement}
    with timer.phase("save"):
        logits = {f"{n}.weight": t.float() for n, t in gathered_logits(masks, backend).items()}
        # the hard masks are the logits' argmax patterns: no second gather
        hard = {name: hard_mask(t, masks[name[: -len(".weight")]].patterns) for name, t in logits.items()}
        # ZeRO-3 keeps the masks attached (their hard mode computes the same W * hard mask for the final
        # evaluation) and rank 0 writes the baked weights it gathers layer by layer.
        state = _baked_state_dict(model, masks, backend) if backend.partitioned else None
        if not backend.partitioned:
            remove_masks(model, bake=True)
        if frozen_bf16 and backend.is_main:  # bake the source's own float32 weights, not their bf16 copies
            state = _rebake_from_source(model, state, hard, loaded.folder)
        if backend.is_main:
            save_masks(out / "masks.safetensors", hard, str(cfg.maskllm.sparsity))
            save_logits(out / "logits.safetensors", logits, cfg.maskllm.sparsity)
            with atomic_dir(out / "model", replace=True) as tmp:
                model.save_pretrained(tmp, state_dict=state)
                tokenizer.save_pretrained(tmp)
    if cfg.evaluation.enabled:
        with timer.phase("evaluate"):
            report["perplexity"] = evaluate(model, eval_windows, cfg.evaluation, note, "final hard mask").as_dict()
    if not backend.is_main:
        backend.close()
        return None
    if cfg.evaluation.enabled:
        with timer.phase("evaluate"):  # ZeRO-3 keeps the weights partitioned: rank 0 reads the saved model
            evaluated = load_model(cfg.model.model_copy(update={"source": str(out / "model")})).model \
                if backend.partitioned and cfg.evaluation.harness_specs else model
            report["evaluation"] = run_tasks(evaluated, tokenizer, cfg.evaluation, report.get("perplexity"))
    report["outputs"] = {"model": "model", "masks": "masks.safetensors", "logits": "logits.safetensors",
                         "plots": _plots(out, history) + [str(p) for p in evaluation_plots(out, report)],
                         "tensorboard": TENSORBOARD_DIR}
    report["timing"] = timer.as_dict()
    finish_report(out, report, learn_report_markdown)
    backend.close()
    return report


@torch.no_grad()
def _rebake_from_source(model: torch.nn.Module, state: Optional[dict[str, torch.Tensor]], hard: dict[str, torch.Tensor],
                        folder: Path) -> Optional[dict[str, torch.Tensor]]:
    """Masked weights = the source folder's weights x hard mask, in the source dtype (a run whose frozen
    weights were held in bf16 must not ship bf16-rounded weights); into ``state`` if given, else the model."""
    from compressor.models.lazy import WeightStore

    store = WeightStore(folder)
    for name, mask in hard.items():
        weight = store.get(name)
        baked = weight * mask.to(weight.dtype)
        if state is not None:
            state[name] = baked
        else:
            model.get_parameter(name).data = baked
    return state


@torch.no_grad()
def _baked_state_dict(model: torch.nn.Module, masks: dict[str, Any], backend: Backend) -> Optional[dict[str, torch.Tensor]]:
    """The model's state dict with each masked weight = W * hard mask, gathered one module at a time
    (every rank takes part); rank 0 gets it on the CPU, the others None."""
    from torch.nn.utils.parametrize import ParametrizationList

    from compressor.methods.maskllm.mask import NMMaskParametrization

    state: dict[str, torch.Tensor] = {}
    for name, module in model.named_modules():
        if isinstance(module, (ParametrizationList, NMMaskParametrization)):
            continue  # read through the linear that owns them
        prefix = f"{name}." if name else ""
        own = dict(module.named_parameters(recurse=False))  # a parametrized weight is not among them
        mask = masks.get(name)
        extra = [module.parametrizations.weight.original, mask.logits] if mask is not None else []
        with backend.gathered(list(own.values()) + extra):
            if not backend.is_main:
                continue
            for key, p in own.items():
                state[prefix + key] = p.detach().cpu().clone()
            for key, b in module.named_buffers(recurse=False):
                if key not in module._non_persistent_buffers_set:
                    state[prefix + key] = b.detach().cpu().clone()
            if mask is not None:
                weight = extra[0]
                state[prefix + "weight"] = (weight * mask.hard_mask().to(weight.dtype)).cpu()
    return state if backend.is_main else None


def _load_transfer_logits(masks: dict[str, Any], path: str) -> None:
    logits = load_logits(Path(path) / "logits.safetensors" if Path(path).is_dir() else path)
    for name, m in masks.items():
        key = f"{name}.weight"
        if key not in logits:
            raise ConfigError(f"init_logits {path} has no logits for {key}")
        m.load_logits(logits[key], what=key)


def _plots(out: Path, history) -> list[str]:
    plots = []
    if history.logs:
        plots.append(plot_lines({"training loss": [(r["tokens"], r["loss"]) for r in history.logs]},
                                out / "plots" / "loss.png", "MaskLLM training loss", "training tokens", "LM loss"))
        plots.append(plot_lines({"mask flip rate": [(r["tokens"], r["flip_rate"]) for r in history.logs],
                                 "mean max prob": [(r["tokens"], r["max_prob"]) for r in history.logs]},
                                out / "plots" / "mask_stats.png", "Mask convergence", "training tokens", "fraction"))
    if history.evals:
        plots.append(plot_lines({"hard-mask perplexity": [(r["tokens"], r["perplexity"]) for r in history.evals]},
                                out / "plots" / "perplexity.png", "Perplexity of the hard mask", "training tokens",
                                "perplexity", logy=True))
    return [str(p.relative_to(out)) for p in plots]


def _worker(rank: int, world_size: int, cfg: LearnConfig, output: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(cfg.deepspeed.master_port))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    setup_logging("INFO" if rank == 0 else "WARNING")
    learn_rank(cfg, output)


def run_learn(cfg: LearnConfig, output: str | Path, overwrite: bool = False, resume: bool = False) -> Optional[dict]:
    """`compressor learn`: one process, or ``deepspeed.world_size`` local ranks (one command; a cluster
    starts one process per rank with its own launcher, RANK set, and rank 0 owns the folder)."""
    if int(os.environ.get("RANK", "0")) != 0:
        return learn_rank(cfg, output)
    with run_folder(output, "learn", input_paths(cfg), overwrite, resume) as folder:
        save_or_check_config(folder.path, cfg, resuming=folder.resumed, ignore=("evaluation",))
        if cfg.backend != "deepspeed" or cfg.deepspeed.world_size == 1 or "RANK" in os.environ:
            return learn_rank(cfg, folder.path)
        import json

        import torch.multiprocessing as mp

        mp.spawn(_worker, args=(cfg.deepspeed.world_size, cfg, str(folder.path)), nprocs=cfg.deepspeed.world_size,
                 join=True)
        return json.loads((folder.path / "report.json").read_text())
