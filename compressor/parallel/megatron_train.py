"""Mask learning on megatron-core TP x PP x DP ranks: ``train_rank`` runs in every worker process.

The launcher (the Ray driver, torchrun, or ``torch.multiprocessing.spawn``) sets RANK, WORLD_SIZE,
MASTER_ADDR, MASTER_PORT and LOCAL_RANK; each rank then:

1. joins the process group (gloo on CPU with the megatron CPU shim, NCCL on GPUs) and megatron's
   parallel state (tensor x pipeline x data);
2. builds its pipeline stage of the GPTModel and reads only its shard of the HF weights;
3. attaches its shard of the learnable masks (``megatron_masks``), from the prior if one is given;
4. streams its data-parallel rank's disjoint windows (every rank of a replica reads the same ones);
5. per optimizer step (``step_gradients``) holds one Gumbel-Softmax sample of each of its masks
   (``maskllm.sample_every: step``; ``micro_batch`` draws one per forward instead), runs
   ``micro_batches`` micro-batches through megatron's forward/backward schedule (1F1B across stages
   when PP > 1), backpropagates the held samples' accumulated gradient into the logits once, averages
   the logits' gradients over data-parallel replicas, and steps torch AdamW on its logits;
6. logs, evaluates the hard mask, checkpoints (``megatron_checkpoint``) like the single-process loop,
   resumes from the latest checkpoint if the output folder has one, and at the end rank 0 writes the
   HF-named ``logits.safetensors``, ``masks.safetensors`` and ``report.json``.

The loss is the single-process loop's: the mean next-token loss of each micro-batch, minus lambda x the
sparse-weight regulariser, averaged over micro-batches and replicas (with a held sample the regulariser
is that of the step's one sample). Logits are not replicated across TP ranks (each owns its rows or
columns, and its gradient is complete locally), so only data parallelism needs a gradient all-reduce;
the frozen weights need none.
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
import torch.distributed as dist

from compressor.errors import ConfigError, NonFiniteError
from compressor.methods.maskllm import (
    hold_samples, mask_stats, mask_train, release_samples, set_schedule_state, sparse_weight_regularizer,
    step_surrogate,
)
from compressor.parallel import megatron_checkpoint as ckpt
from compressor.parallel.config import DistributedLearnConfig
from compressor.parallel.megatron_convert import LlamaDims
from compressor.parallel.megatron_masks import (
    MaskSet, as_mask_dict, attach_sharded_masks, check_tp_mask_shapes, fused_level_of, gather_hf, hf_linear_shapes,
    load_hf_logits, masked_forward, original_weights, select_linears,
)
from compressor.parallel.megatron_model import (
    Layout, build_gpt_model, destroy_model_parallel, init_distributed, init_model_parallel, load_hf_weights,
    open_hf_folder,
)
from compressor.precision import DTYPES, bf16_products
from compressor.methods.maskllm.schedules import schedule_at
from compressor.reporting.tensorboard import TENSORBOARD_DIR, ScalarWriter
from compressor.sparsity.plan import ResolvedPlan
from compressor.training.learners.maskllm import maskllm_log_values
from compressor.training.loop import log_row
from compressor.utils.env import flush_denormals
from compressor.utils.logging import get_logger
from compressor.utils.timing import WindowClock

log = get_logger(__name__)

CHECKPOINTS = "checkpoints"
# Config sections a resumed run may change: more steps, another evaluation, placement, TP/PP layout.
RESUMABLE_CHANGES = ("train.steps", "evaluation", "ray", "parallel", "train.log_every", "train.eval_every",
                     "train.checkpoint_every", "train.keep_checkpoints")
RESUMABLE_DESCRIPTION = "steps, evaluation, logging/checkpoint intervals, the parallel layout and ray"


# -- one forward/backward over the micro-batches of a step -----------------------------------------
class _AddLossGradient(torch.autograd.Function):
    """Identity on ``output``; in backward also feeds ``scale`` as d(loss)/d(extra) into ``extra``.

    It adds a stage-local term (the regulariser of this rank's masks) to the loss without sending it
    down the pipeline: every stage's term reaches its own logits in that stage's backward pass.
    """

    @staticmethod
    def forward(ctx, output: torch.Tensor, extra: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        ctx.save_for_backward(extra)
        return output.view_as(output)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (extra,) = ctx.saved_tensors
        return grad, torch.full_like(extra, ctx.scale), None


def _split_window(window: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) window -> inputs (B, T-1) and next-token labels (B, T-1), as the HF loss shifts them."""
    return window[:, :-1].contiguous(), window[:, 1:].contiguous()


def _forward_step(masks: MaskSet, lam: float, num_microbatches: int, data: Iterator, model):
    """megatron's forward_step_func: one micro-batch through this stage."""
    tokens, labels = next(data)
    positions = torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0).expand_as(tokens)
    with masked_forward():
        output = model(tokens, positions, attention_mask=None, labels=labels)  # last stage: (B, T-1) token losses
    if lam > 0 and model.training:
        # d(total loss)/d(regulariser) = -lambda / micro-batches, as in the single-process loop.
        reg = sparse_weight_regularizer(as_mask_dict(masks))
        output = _AddLossGradient.apply(output, reg, -lam / num_microbatches)

    def loss_func(token_losses: torch.Tensor):
        nll_sum = token_losses.float().sum()
        loss = nll_sum / token_losses.numel()
        # Plain numbers: the schedule divides the returned loss in place by the number of micro-batches.
        return loss, {"loss": float(loss), "nll_sum": float(nll_sum), "tokens": token_losses.numel()}

    return output, loss_func


def forward_backward(model, masks: MaskSet, windows: Sequence[torch.Tensor], lam: float = 0.0,
                     forward_only: bool = False) -> list[dict[str, Any]]:
    """Run the micro-batches ``windows`` (each (B, T)) through megatron's schedule for this rank's stage.

    Gradients accumulate into the logits (mean over micro-batches); returns the per-micro-batch loss
    records on the last pipeline stage, [] elsewhere.
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func

    batch, length = windows[0].shape
    data = iter([_split_window(w) for w in windows])
    run = get_forward_backward_func()
    chunks = model if isinstance(model, (list, tuple)) else [model]
    bf16 = any(p.dtype == torch.bfloat16 for chunk in chunks for p in chunk.parameters())
    # bf16 megatron weights on a CPU without bf16 units: float32 GEMMs of the same bf16 numbers
    with bf16_products() if bf16 else nullcontext():
        return run(forward_step_func=partial(_forward_step, masks, lam, len(windows)), data_iterator=data,
                   model=model, num_microbatches=len(windows), seq_length=length - 1, micro_batch_size=batch,
                   forward_only=forward_only)


SAMPLE_EVERY = ("step", "micro_batch")


def step_gradients(model, masks: MaskSet, windows: Sequence[torch.Tensor], lam: float, layout: Layout,
                   sample_every: str = "step") -> list[dict[str, Any]]:
    """One optimizer step's logits gradients on this rank, averaged over data-parallel replicas.

    ``sample_every="step"``: each of this stage's masks holds one sample W * mask for the whole step;
    every micro-batch forward reads it (both reads of a ColumnParallelLinear included) and every
    backward, interleaved by 1F1B, accumulates into the same detached leaf. megatron divides each
    micro-batch's loss by the number of micro-batches, so the leaf collects G = d(mean micro-batch
    loss) / d(W * mask); one backward of ``step_surrogate`` (<W * mask, G> - lambda ||W * mask||^2)
    then gives the logits the gradient of (mean loss - lambda x regulariser) for that one sample, as the
    single-process loop does. The DP average below makes it the mean over replicas (whose noise differs).
    ``"micro_batch"``: a fresh sample per forward, its regulariser fed in per micro-batch.
    Returns the per-micro-batch loss records on the last stage ([] elsewhere).
    """
    if sample_every not in SAMPLE_EVERY:
        raise ValueError(f"sample_every must be one of {SAMPLE_EVERY}, got {sample_every!r}")
    if sample_every == "micro_batch":
        records = forward_backward(model, masks, windows, lam)
    else:
        plain = as_mask_dict(masks)
        hold_samples(original_weights(model, masks), plain)
        try:
            records = forward_backward(model, masks, windows, lam=0.0)  # the regulariser is in the surrogate
        except BaseException:
            release_samples(plain)  # a failed step must not leave the next forward on a stale sample
            raise
        step_surrogate(plain, lam).backward()
    allreduce_logit_grads(masks, layout)
    return records


def allreduce_logit_grads(masks: MaskSet, layout: Layout) -> None:
    """Average the logits' gradients over data-parallel replicas (one flat all-reduce)."""
    if layout.dp_size == 1:
        return
    from megatron.core import parallel_state as ps

    grads = [s.mask.logits.grad for s in masks.values()]
    if any(g is None for g in grads):
        raise RuntimeError("a mask received no gradient; was the forward pass run with soft (training) masks?")
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, group=ps.get_data_parallel_group())
    flat /= layout.dp_size
    offset = 0
    for g in grads:
        g.copy_(flat[offset: offset + g.numel()].view_as(g))
        offset += g.numel()


def global_loss(records: list[dict[str, Any]], layout: Layout) -> float:
    """The step's loss (mean over micro-batches and replicas), known on every rank."""
    total = torch.zeros(2, dtype=torch.float64)
    if layout.is_last_stage and layout.tp_rank == 0 and records:
        total[0] = sum(float(r["loss"]) for r in records) / len(records)
        total[1] = 1.0
    dist.all_reduce(total)
    return float(total[0] / total[1])


def _max_over_ranks(value: float) -> float:
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def global_mask_stats(masks: MaskSet, prev_argmax: Optional[dict[str, torch.Tensor]]) -> dict[str, float]:
    """mask_stats over all shards of one replica (max_prob and flip_rate weighted by groups)."""
    from megatron.core import parallel_state as ps

    local = mask_stats(as_mask_dict(masks), prev_argmax)
    groups = local["groups"]
    sums = torch.tensor([local["max_prob"] * groups, local.get("flip_rate", 0.0) * groups, groups], dtype=torch.float64)
    dist.all_reduce(sums, group=ps.get_model_parallel_group())
    return {"max_prob": float(sums[0] / sums[2]), "flip_rate": float(sums[1] / sums[2]), "groups": float(sums[2])}


@torch.no_grad()
def hard_mask_perplexity(model, masks: MaskSet, windows: torch.Tensor, batch_size: int, layout: Layout) -> float:
    """Perplexity of the hard (argmax) masks on (W, T) windows, split over data-parallel replicas."""
    mask_train(as_mask_dict(masks), False)
    model.eval()
    mine = windows[layout.dp_rank:: layout.dp_size]
    batches = [mine[i: i + batch_size] for i in range(0, mine.shape[0], batch_size)]
    total = torch.zeros(2, dtype=torch.float64)
    # Equal-sized micro-batches keep the pipeline's tensor shapes fixed; a short last batch runs on its own.
    for group in _same_shape_runs(batches):
        records = forward_backward(model, masks, group, forward_only=True)
        if layout.is_last_stage and layout.tp_rank == 0:
            total[0] += sum(float(r["nll_sum"]) for r in records)
            total[1] += sum(r["tokens"] for r in records)
    dist.all_reduce(total)
    model.train()
    mask_train(as_mask_dict(masks), True)
    return math.exp(float(total[0] / total[1]))


def _same_shape_runs(batches: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    runs: list[list[torch.Tensor]] = []
    for b in batches:
        if runs and runs[-1][0].shape == b.shape:
            runs[-1].append(b)
        else:
            runs.append([b])
    return runs


def _eval_windows_all_ranks(cfg: DistributedLearnConfig, tokenizer, layout: Layout) -> torch.Tensor:
    """Every rank needs the same windows; each reads them (cached token ids make this cheap)."""
    from compressor.runs.common import eval_windows_for

    windows, _ = eval_windows_for(cfg.evaluation, tokenizer)
    if windows.shape[0] < layout.dp_size:
        raise ConfigError(f"evaluation has {windows.shape[0]} windows for {layout.dp_size} data-parallel replicas; "
                          "raise evaluation.max_windows or use a longer evaluation text")
    return windows


# -- the worker ------------------------------------------------------------------------------------
def _model_folder(cfg: DistributedLearnConfig) -> Path:
    from compressor.models.loading import local_folder, resolve_source

    # Rank 0 first: a GGUF source is converted once into the cache, then everyone reads it.
    if dist.get_rank() == 0:
        folder = local_folder(resolve_source(cfg.model.source, cfg.model.gguf_file, cfg.model.revision))
    dist.barrier()
    if dist.get_rank() != 0:
        folder = local_folder(resolve_source(cfg.model.source, cfg.model.gguf_file, cfg.model.revision))
    return folder


def _on_rank0(check: Callable[[], None]) -> None:
    """Run ``check`` on rank 0; a ConfigError it raises is raised on every rank with the same message, so
    that none waits forever for a rank that refused."""
    problem: list[Optional[str]] = [None]
    if dist.get_rank() == 0:
        try:
            check()
        except ConfigError as exc:
            problem[0] = str(exc)
    dist.broadcast_object_list(problem, src=0)
    if problem[0] is not None:
        raise ConfigError(problem[0])


def _resolve_plan(cfg: DistributedLearnConfig, dims: LlamaDims, layout: Layout) -> Optional[ResolvedPlan]:
    """The run's sparsity plan against the HF linears the targets select, checked for every layer on every
    rank before any work (a fused QKV or gate/up takes one level; each level's M tiles its TP shards), so
    that all ranks fail alike and none waits for a stage that refused."""
    if cfg.sparsity_plan is None:
        return None
    from compressor.runs.learn import maskllm_levels

    chosen = select_linears(dims, range(dims.layers), cfg.targets, cfg.ignore)
    resolved = maskllm_levels(cfg, hf_linear_shapes(dims, chosen))
    level_of = fused_level_of(resolved.levels, cfg.maskllm.sparsity)
    for i, kind in chosen:
        level_of(i, kind)
    check_tp_mask_shapes(dims, layout.tp_size, level_of, sorted({i for i, _ in chosen}))
    return resolved


def _priors(cfg: DistributedLearnConfig) -> Optional[dict[str, torch.Tensor]]:
    if cfg.init_logits or cfg.prior.kind == "none":
        return None
    from compressor.checkpoints.masks import load_masks

    path = Path(cfg.prior.path)
    return load_masks(path / "masks.safetensors" if path.is_dir() else path)


def _link_model(out: Path, folder: Path) -> None:
    """``model/`` links the dense base model, so `compressor export <run>` applies masks.safetensors to it."""
    from compressor.utils.fs import atomic_dir

    with atomic_dir(out / "model", replace=True) as tmp:
        for f in folder.iterdir():
            if f.is_file():
                try:
                    (tmp / f.name).symlink_to(f.resolve())
                except OSError:
                    import shutil

                    shutil.copy2(f, tmp / f.name)


def train_rank(cfg: DistributedLearnConfig, output: str) -> Optional[dict[str, Any]]:
    """Learn masks on this rank; rank 0 returns the report (also written to ``output/report.json``).

    Resumes from ``output/checkpoints/latest`` when present (also after a TP/PP change, with the same
    data-parallel size); calling again with more ``train.steps`` continues a finished run.
    """
    init_distributed(cfg.parallel.timeout_minutes)
    flush_denormals()
    try:
        return _train(cfg, Path(output))
    finally:
        destroy_model_parallel()
        if dist.is_initialized():
            dist.destroy_process_group()


def _train(cfg: DistributedLearnConfig, out: Path) -> Optional[dict[str, Any]]:
    from compressor.models.loading import load_tokenizer
    from compressor.runs.common import save_or_check_config
    from compressor.runs.learn import make_stream
    from compressor.runs.plans import setup_plan

    world = dist.get_world_size()
    if world != cfg.parallel.world_size:
        raise ConfigError(f"{world} ranks were started, but parallel.world_size is {cfg.parallel.world_size} "
                          f"(tensor {cfg.parallel.tensor} x pipeline {cfg.parallel.pipeline} x data "
                          f"{cfg.parallel.data}); start as many workers as the config asks for")
    t, mcfg = cfg.train, cfg.maskllm
    torch.manual_seed(t.seed)
    layout = init_model_parallel(cfg.parallel.tensor, cfg.parallel.pipeline, t.seed)
    root = out / CHECKPOINTS
    rank0 = dist.get_rank() == 0
    resuming = ckpt.latest_checkpoint(root) is not None

    def check_config() -> None:
        out.mkdir(parents=True, exist_ok=True)
        save_or_check_config(out, cfg, resuming=resuming, ignore=RESUMABLE_CHANGES, may_change=RESUMABLE_DESCRIPTION)

    _on_rank0(check_config)
    timer: dict[str, float] = {}
    started = time.perf_counter()

    folder = _model_folder(cfg)
    _, dims, get = open_hf_folder(folder)
    plan = _resolve_plan(cfg, dims, layout)
    if plan is not None:
        _on_rank0(lambda: setup_plan(out, cfg.sparsity_plan, resuming, plan.shapes))
    dtype = DTYPES[cfg.megatron_dtype]
    model = build_gpt_model(dims, layout, dtype)
    load_hf_weights(model, get, dims, layout)
    masks = attach_sharded_masks(model, dims, layout, mcfg, seed=t.seed, priors=_priors(cfg),
                                 targets=cfg.targets, ignore=cfg.ignore, levels=plan and plan.levels)
    if cfg.init_logits:
        from compressor.checkpoints.logits import load_logits

        path = Path(cfg.init_logits)
        load_hf_logits(masks, load_logits(path / "logits.safetensors" if path.is_dir() else path), dims, layout)
    tokenizer = load_tokenizer(folder)
    stream = make_stream(cfg, tokenizer, layout.dp_rank, layout.dp_size)
    from compressor.training.backends import adamw, scale_learning_rates

    optimizer = adamw([{"params": [s.mask.logits for s in masks.values()], "lr": mcfg.logits_lr}])
    timer["load"] = time.perf_counter() - started

    history: dict[str, list] = {"logs": [], "evals": []}
    start = 0
    found = ckpt.latest_checkpoint(root)
    if found is not None:
        start, history = ckpt.load(found, masks, optimizer, stream, dims, layout)
        log.info("resumed from %s at step %d (%s)", found, start, layout.describe())
    eval_windows = None
    if cfg.evaluation.enabled and t.eval_every:
        eval_windows = _eval_windows_all_ranks(cfg, tokenizer, layout)

    n_mb = cfg.num_microbatches
    if layout.pp_size > 1 and n_mb < layout.pp_size:
        log.warning("%d micro-batches per step for %d pipeline stages: stages idle part of every step "
                    "(set parallel.micro_batches >= %d)", n_mb, layout.pp_size, layout.pp_size)
    tokens_per_step = t.micro_batch_size * n_mb * t.seq_len * layout.dp_size  # counted as the single-process loop does
    plain = as_mask_dict(masks)
    prev_argmax = {n: m.argmax_patterns() for n, m in plain.items()}
    mask_train(plain, True)
    model.train()
    window_loss, window_steps, clock = 0.0, 0, WindowClock()  # evaluation and checkpoints not counted
    scalars = ScalarWriter(out / TENSORBOARD_DIR) if rank0 else None
    train_start = time.perf_counter()
    for step in range(start, t.steps):
        tau, kappa, lam = schedule_at(mcfg, step, t.steps)
        set_schedule_state(plain, tau, kappa)
        lr_scale = t.lr_scale_at(step)
        scale_learning_rates(optimizer.param_groups, [mcfg.logits_lr], lr_scale)
        windows = [stream.next_batch(t.micro_batch_size) for _ in range(n_mb)]  # each (B, T)
        records = step_gradients(model, masks, windows, lam, layout, mcfg.sample_every)
        loss = global_loss(records, layout)
        if not math.isfinite(loss):
            raise NonFiniteError(f"non-finite loss at step {step}; the last good checkpoint in {root} is intact "
                                 "(lower maskllm.logits_lr or check the data and weights, then run again to resume)")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        window_loss += loss
        window_steps += 1
        done = step + 1
        if done % t.log_every == 0 or done == t.steps:
            stats = global_mask_stats(masks, prev_argmax)
            prev_argmax = {n: m.argmax_patterns() for n, m in plain.items()}
            seconds = _max_over_ranks(clock.seconds())  # one value for every rank's history
            row = log_row(done, tokens_per_step, window_loss / window_steps,
                          {**maskllm_log_values((tau, kappa, lam), stats), "lr_scale": lr_scale},
                          seconds, window_steps)
            history["logs"].append(row)
            if rank0:
                scalars(row, done, "train")
                log.info("step %d: loss %.4f tau %.3f kappa %.1f max_prob %.4f flips %.5f", done, row["loss"], tau,
                         kappa, row["max_prob"], row["flip_rate"])
            window_loss, window_steps = 0.0, 0
            clock.restart()
        with clock.paused():
            if eval_windows is not None and (done % t.eval_every == 0 or done == t.steps):
                ppl = hard_mask_perplexity(model, masks, eval_windows, cfg.evaluation.batch_size, layout)
                history["evals"].append({"step": done, "tokens": done * tokens_per_step, "perplexity": ppl})
                if rank0:
                    scalars(history["evals"][-1], done, "eval")
                    log.info("step %d: hard-mask perplexity %.3f", done, ppl)
            if done % t.checkpoint_every == 0 or done == t.steps:
                ckpt.save(root, done, masks, optimizer, stream, dims, layout, history, t.keep_checkpoints)
    timer["train"] = time.perf_counter() - train_start
    if scalars is not None:
        scalars.close()
    mask_train(plain, False)
    return _finish(cfg, out, folder, masks, dims, layout, history, timer, plan)


def _finish(cfg: DistributedLearnConfig, out: Path, folder: Path, masks: MaskSet, dims: LlamaDims, layout: Layout,
            history: dict[str, list], timer: dict[str, float], plan: Optional[ResolvedPlan] = None
            ) -> Optional[dict[str, Any]]:
    """Rank 0 writes HF-named logits and hard masks (each layer checked against its level), a ``model/``
    link and ``report.json`` (with the plan's level table and heatmap for a mixed run)."""
    from compressor.checkpoints.logits import save_logits
    from compressor.checkpoints.masks import save_masks
    from compressor.runs.common import finish_report
    from compressor.runs.plans import PLAN_FILE, record_plan, uniform_text, weight_levels
    from compressor.sparsity import is_nm

    logits = gather_hf(masks, dims, layout, lambda m: m.logits.detach().float())
    hard = gather_hf(masks, dims, layout, lambda m: m.hard_mask())
    peak = _peak_rss_all(layout)
    nodes = _nodes_all()
    if dist.get_rank() != 0:
        return None
    nm = cfg.maskllm.sparsity
    by_weight = {f"{n}.weight": lv for n, lv in plan.levels.items()} if plan is not None else None
    save_logits(out / "logits.safetensors", logits, nm, by_weight)
    if plan is None:
        save_masks(out / "masks.safetensors", hard, str(nm))
    else:
        save_masks(out / "masks.safetensors", hard, uniform_text(plan), weight_levels(plan))
    _link_model(out, folder)
    pattern_ok = all(is_nm(mask, by_weight[n] if by_weight else nm) for n, mask in hard.items())
    report: dict[str, Any] = {
        "method": "maskllm", "sparsity": str(nm) if plan is None else "mixed", "pattern_ok": pattern_ok,
        "model": {"source": cfg.model.source},
        "config": cfg.model_dump(mode="json"), "precision": cfg.precision.describe(), "backend": "megatron",
        "parallel": {"tensor": layout.tp_size, "pipeline": layout.pp_size, "data": layout.dp_size,
                     "world_size": dist.get_world_size(), "micro_batches": cfg.num_microbatches,
                     "nodes": nodes},
        "history": history,
        "outputs": {"masks": "masks.safetensors", "logits": "logits.safetensors",
                    "model": "model (links to the dense base model; export applies masks.safetensors)",
                    "tensorboard": TENSORBOARD_DIR},
        "timing": timer, "memory": {"peak_rss_bytes_per_rank": peak},
    }
    if history["evals"]:
        report["perplexity"] = history["evals"][-1]
    if plan is not None:
        plots = record_plan(out, plan, cfg.sparsity_plan, report, "maskllm (megatron): N:M per layer")
        report["outputs"].update(plan=PLAN_FILE, plots=[str(p) for p in plots])
    return finish_report(out, report)


def _nodes_all() -> list[str]:
    """Each rank's node: the Ray node id the driver set, else the host name (torchrun, spawn)."""
    import os
    import socket

    from compressor.parallel.ray_driver import NODE_ID_ENV

    every: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(every, os.environ.get(NODE_ID_ENV) or socket.gethostname())
    return [str(n) for n in every]


def _peak_rss_all(layout: Layout) -> list[int]:
    from compressor.utils.env import peak_rss_bytes

    mine = torch.tensor([peak_rss_bytes()], dtype=torch.int64)
    every = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(every, mine)
    return [int(x) for x in every]
