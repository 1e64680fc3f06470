"""The mask-learning loop, read top to bottom: sample a batch, forward with soft masks, backward into
the logits, step, and now and then log, evaluate the hard mask and checkpoint.

It knows nothing of how ranks are arranged (see backends.py) nor of where the logits came from.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional

import torch
from tqdm.auto import tqdm

from compressor.errors import NonFiniteError
from compressor.methods.maskllm import (
    hold_samples, mask_stats, mask_train, set_schedule_state, sparse_weight_regularizer, step_surrogate,
)
from compressor.methods.maskllm.attach import pattern_ids
from compressor.methods.maskllm.config import MaskLLMConfig
from compressor.precision import Precision
from compressor.training.backends import Backend
from compressor.utils.env import flush_denormals
from compressor.utils.timing import WindowClock
from compressor.training.checkpoint import (
    latest_checkpoint, load_checkpoint, rng_state, save_checkpoint, set_rng_state,
)
from compressor.training.config import TrainConfig
from compressor.utils.logging import get_logger

log = get_logger(__name__)


@dataclass
class History:
    logs: list[dict[str, float]] = field(default_factory=list)  # every log_every steps
    evals: list[dict[str, float]] = field(default_factory=list)  # hard-mask perplexity


def schedule_at(mcfg: MaskLLMConfig, step: int, total: int) -> tuple[float, float, float]:
    """(tau, kappa, lambda) for ``step`` of ``total``."""
    return (mcfg.tau.value_at(step, total), mcfg.kappa.value_at(step, total), mcfg.regularizer.value_at(step, total))


def gathered_layers(masks: dict[str, Any], backend: Backend, write: bool = False) -> Iterator[tuple[str, Any]]:
    """(name, mask) with that mask's logits whole, one layer at a time (ZeRO-3 gathers and re-partitions
    each in turn: every rank must run the whole loop). ``write``: keep in-place changes to the logits."""
    for name, m in masks.items():
        with backend.gathered([m.logits], write=write):
            yield name, m


def gathered_logits(masks: dict[str, Any], backend: Backend) -> dict[str, torch.Tensor]:
    """{name: a copy of the whole logits} on rank 0 ({} elsewhere); every rank takes part in the gathers."""
    return {n: m.logits.detach().clone() for n, m in gathered_layers(masks, backend) if backend.is_main}


def gathered_pattern_ids(masks: dict[str, Any], backend: Backend) -> dict[str, torch.Tensor]:
    return {n: pattern_ids(m.argmax_patterns()) for n, m in gathered_layers(masks, backend)}


def train_masks(
    model: torch.nn.Module,
    masks: dict[str, Any],
    mcfg: MaskLLMConfig,
    tcfg: TrainConfig,
    stream,
    backend: Backend,
    checkpoint_root: Path,
    evaluate: Optional[Callable[[], float]] = None,
    tokens_per_step: Optional[int] = None,
    scalars: Optional[Callable[[Mapping[str, float], int, str], None]] = None,
    precision: Precision = Precision(),
) -> History:
    """Train ``masks`` (attached to ``model``) for ``tcfg.steps`` optimizer steps, resuming if possible.
    ``scalars(values, step, prefix)`` also receives every log row and evaluation (e.g. TensorBoard).
    Forward passes run under ``precision``'s autocast; samples and their gradients stay float32 then."""
    history = History()
    start = 0
    flush_denormals()
    found = latest_checkpoint(checkpoint_root)
    if found is not None:
        start, shared, mine = load_checkpoint(found, backend.rank)
        with torch.no_grad():
            for name, m in gathered_layers(masks, backend, write=True):
                m.logits.copy_(shared["logits"][name])
        backend.load_optimizer_state(mine["optimizer"])
        stream.load_state_dict(mine["stream"])
        set_rng_state(mine["rng"])
        for name, m in masks.items():
            m.generator.set_state(mine["mask_rng"][name])
        history = History(**shared["history"])
        log.info("resumed from %s at step %d", found, start)
    tokens_per_step = tokens_per_step or tcfg.micro_batch_size * tcfg.grad_accum * tcfg.seq_len * backend.world_size
    prev_argmax = gathered_pattern_ids(masks, backend)
    if evaluate is not None and tcfg.eval_every and start == 0:  # the starting point of the curve: the prior
        mask_train(masks, False)
        history.evals.append({"step": 0, "tokens": 0, "perplexity": evaluate()})
        if scalars is not None:
            scalars(history.evals[-1], 0, "eval")
        log.info("step 0: hard-mask perplexity %.3f", history.evals[-1]["perplexity"])
    mask_train(masks, True)
    model.train()  # no dropout in LLaMA; the mode only selects soft (train) vs hard (eval) masks
    bar = tqdm(total=tcfg.steps, initial=start, desc="learn masks", unit="step", disable=not backend.is_main)
    window_loss = torch.zeros((), dtype=torch.float64)
    window_steps, clock = 0, WindowClock()  # throughput counts training only, not evaluation or checkpoints
    per_step = mcfg.sample_every == "step"  # one sample held for all micro-batches of a step
    for step in range(start, tcfg.steps):
        tau, kappa, lam = schedule_at(mcfg, step, tcfg.steps)
        set_schedule_state(masks, tau, kappa)
        step_loss = torch.zeros((), dtype=torch.float64)
        if per_step:
            hold_samples(model, masks, dtype=torch.float32 if precision.compute != "float32" else None)
        for _ in range(tcfg.grad_accum):
            ids = stream.next_batch(tcfg.micro_batch_size)  # (B, T)
            with precision.autocast(ids.device):
                lm_loss = model(input_ids=ids, labels=ids, use_cache=False).loss.float()
            _check_finite(lm_loss, step, checkpoint_root)
            if per_step:  # gradients collect on the held samples; the logits get them once, below
                (lm_loss / tcfg.grad_accum).backward()
            else:  # subtracting the kept weights' energy rewards masks that keep large weights
                loss = lm_loss - lam * sparse_weight_regularizer(masks) if lam > 0 else lm_loss
                _check_finite(loss, step, checkpoint_root)
                backend.backward(loss)
            step_loss += lm_loss.detach().double() / tcfg.grad_accum
        if per_step:
            surrogate = step_surrogate(masks, lam)
            _check_finite(surrogate, step, checkpoint_root)
            backend.backward(surrogate)
        backend.step()
        window_loss += backend.all_mean(step_loss)
        window_steps += 1
        done = step + 1
        bar.update(1)
        if done % tcfg.log_every == 0 or done == tcfg.steps:
            current: dict[str, torch.Tensor] = {}
            stats = mask_stats(gathered_layers(masks, backend), prev_argmax, current)
            prev_argmax = current
            row = log_row(done, tokens_per_step, float(window_loss / window_steps), (tau, kappa, lam), stats,
                          clock.seconds(), window_steps)
            history.logs.append(row)
            if scalars is not None:
                scalars(row, done, "train")
            bar.set_postfix(loss=f"{row['loss']:.3f}", tau=f"{tau:.2f}", flips=f"{row['flip_rate']:.4f}")
            window_loss.zero_()
            window_steps = 0
            clock.restart()
        with clock.paused():
            if evaluate is not None and tcfg.eval_every and (done % tcfg.eval_every == 0 or done == tcfg.steps):
                mask_train(masks, False)
                ppl = evaluate()
                mask_train(masks, True)
                history.evals.append({"step": done, "tokens": done * tokens_per_step, "perplexity": ppl})
                log.info("step %d: hard-mask perplexity %.3f", done, ppl)
                if scalars is not None:
                    scalars(history.evals[-1], done, "eval")
            if done % tcfg.checkpoint_every == 0 or done == tcfg.steps:
                _save(checkpoint_root, done, masks, backend, stream, history, tcfg.keep_checkpoints)
    bar.close()
    mask_train(masks, False)
    return history


def log_row(done: int, tokens_per_step: int, loss: float, schedule: tuple[float, float, float],
            stats: dict[str, float], seconds: float, steps: int) -> dict[str, float]:
    """One history row: the window's mean loss, the schedule, mask statistics and throughput."""
    tau, kappa, lam = schedule
    return {"step": done, "tokens": done * tokens_per_step, "loss": loss, "tau": tau, "kappa": kappa, "lambda": lam,
            "max_prob": stats["max_prob"], "flip_rate": stats["flip_rate"], "seconds_per_step": seconds / steps,
            "tokens_per_second": tokens_per_step * steps / seconds}


def backend_grad_accum(mcfg: MaskLLMConfig, tcfg: TrainConfig) -> int:
    """Backward calls per optimizer step the backend sees: one surrogate per step with held samples."""
    return 1 if mcfg.sample_every == "step" else tcfg.grad_accum


def _check_finite(loss: torch.Tensor, step: int, checkpoint_root: Path) -> None:
    if not torch.isfinite(loss):
        raise NonFiniteError(
            f"non-finite loss at step {step}; the last good checkpoint in {checkpoint_root} is intact "
            "(lower maskllm.logits_lr or check the data and weights, then --resume)"
        )


def _save(root: Path, step: int, masks: dict[str, Any], backend: Backend, stream, history: History, keep: int) -> None:
    shared = None
    logits = gathered_logits(masks, backend)
    if backend.is_main:
        shared = {"logits": logits, "history": {"logs": history.logs, "evals": history.evals}}
    mine = {"optimizer": backend.optimizer_state(), "stream": stream.state_dict(), "rng": rng_state(),
            "mask_rng": {n: m.generator.get_state() for n, m in masks.items()}}
    save_checkpoint(root, step, backend.rank, shared, mine, backend.barrier, keep)
