"""The training loop, read top to bottom: per optimizer step the learner sets up the step, every
micro-batch runs forward, loss and backward in one function (``micro_step``), the optimizer steps, and
now and then the loop logs, evaluates the hard masks and checkpoints.

It knows nothing of the training method (``compressor.training.learners``: MaskLLM, SR-STE, PDP, ...),
nor of how ranks are arranged (``backends.py``), nor of where the starting point came from.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import torch
from tqdm.auto import tqdm

from compressor.errors import NonFiniteError
from compressor.precision import Precision
from compressor.training.backends import Backend
from compressor.training.checkpoint import (
    latest_checkpoint, load_checkpoint, rng_state, save_checkpoint, set_rng_state,
)
from compressor.training.config import TrainConfig
from compressor.training.learners.base import Learner
from compressor.training.objective import Objective, next_token
from compressor.utils.env import flush_denormals
from compressor.utils.logging import get_logger
from compressor.utils.timing import PhaseTimer, WindowClock

log = get_logger(__name__)


@dataclass
class History:
    logs: list[dict[str, float]] = field(default_factory=list)  # every log_every steps
    evals: list[dict[str, float]] = field(default_factory=list)  # hard-mask perplexity (and curve task scores)
    # {weight name: packed bits} of the hard masks at step 0 (rank 0; None for a method without masks):
    # what the final masks' change is measured against
    start_masks: Optional[dict[str, torch.Tensor]] = None


def micro_step(model: torch.nn.Module, ids: torch.Tensor, learner: Learner, objective: Objective,
               backend: Backend, grad_accum: int, check: Callable[[torch.Tensor], None],
               precision: Precision = Precision()) -> torch.Tensor:
    """One micro-batch: forward and the objective plus the learner's terms under ``precision``'s autocast,
    then backward. Returns the detached next-token loss."""
    with precision.autocast(ids.device):
        outputs = model(input_ids=ids, labels=ids, use_cache=False)
        lm_loss = outputs.loss.float()
        check(lm_loss)
        loss = learner.micro_loss(objective(outputs, ids).float())
    if loss is not lm_loss:
        check(loss)
    with precision.products(ids.device):  # custom backward products (BDWP's, the masks') may be bf16
        learner.backward(loss, backend, grad_accum)
    return lm_loss.detach()


def train(
    model: torch.nn.Module,
    learner: Learner,
    tcfg: TrainConfig,
    stream,
    backend: Backend,
    checkpoint_root: Path,
    evaluate: Optional[Callable[[], Mapping[str, float]]] = None,
    tokens_per_step: Optional[int] = None,
    objective: Objective = next_token,
    scalars: Optional[Callable[[Mapping[str, float], int, str], None]] = None,
    precision: Precision = Precision(),
    phases: Optional[PhaseTimer] = None,
) -> History:
    """Train ``learner`` (attached to ``model``) for ``tcfg.steps`` optimizer steps, resuming if possible.
    ``evaluate()`` scores the hard-mask model: ``{"perplexity": ..., "<task>/<metric>": ...}``.
    ``scalars(values, step, prefix)`` also receives every log row and evaluation (e.g. TensorBoard);
    micro-batches run under ``precision`` (``micro_step``). ``phases`` (the run's timer) gets the seconds and
    peak RSS of the optimizer steps, the curve's evaluations and the checkpoints as phases of their own."""
    phase = phases.phase if phases is not None else (lambda name: nullcontext())
    history = History()
    start = 0
    flush_denormals()
    found = latest_checkpoint(checkpoint_root)
    if found is not None:
        start, shared, mine = load_checkpoint(found, backend.rank)
        learner.load_state(shared, mine, backend)
        learner.load_streamed(found, backend)
        backend.load_optimizer_state(mine["optimizer"])
        stream.load_state_dict(mine["stream"])
        set_rng_state(mine["rng"])
        history = History(**shared["history"], start_masks=shared.get("start_masks"))
        log.info("resumed from %s at step %d", found, start)
    else:
        history.start_masks = learner.packed_hard_masks(backend)
    tokens_per_step = tokens_per_step or tcfg.micro_batch_size * tcfg.grad_accum * tcfg.seq_len * backend.world_size
    learner.start(backend)
    if evaluate is not None and tcfg.eval_every and start == 0:  # the starting point of the curve
        learner.set_learning(False)
        history.evals.append({"step": 0, "tokens": 0, **evaluate()})
        log.info("step 0: hard-mask perplexity %.3f", history.evals[-1]["perplexity"])
        if scalars is not None:
            scalars(history.evals[-1], 0, "eval")
    learner.set_learning(True)
    model.train()  # no dropout in LLaMA; the learner's mode selects soft (train) vs hard (eval) masks
    bar = tqdm(total=tcfg.steps, initial=start, desc=f"train ({learner.kind})", unit="step",
               disable=not backend.is_main)
    window_loss = torch.zeros((), dtype=torch.float64)
    window_steps, clock = 0, WindowClock()  # throughput counts training only, not evaluation or checkpoints
    for step in range(start, tcfg.steps):
        check = lambda t, s=step: _check_finite(t, s, checkpoint_root, learner.lr_keys)  # noqa: E731
        with phase("optimizer steps"):
            schedule = learner.begin_step(step, tcfg.steps)
            schedule["lr_scale"] = tcfg.lr_scale_at(step)
            backend.scale_lr(schedule["lr_scale"])  # after a resume too: the optimizer state held the old lr
            step_loss = torch.zeros((), dtype=torch.float64)
            for _ in range(tcfg.grad_accum):
                ids = stream.next_batch(tcfg.micro_batch_size)  # (B, T)
                lm_loss = micro_step(model, ids, learner, objective, backend, tcfg.grad_accum, check, precision)
                step_loss += lm_loss.double() / tcfg.grad_accum
            extra = learner.step_loss()
            if extra is not None:
                check(extra)
                backend.backward(extra)
            backend.step()
            learner.after_step()
        window_loss += backend.all_mean(step_loss)
        window_steps += 1
        done = step + 1
        bar.update(1)
        if done % tcfg.log_every == 0 or done == tcfg.steps:
            row = log_row(done, tokens_per_step, float(window_loss / window_steps),
                          {**schedule, **learner.stats(backend)}, clock.seconds(), window_steps)
            history.logs.append(row)
            if scalars is not None:
                scalars(row, done, "train")
            bar.set_postfix(loss=f"{row['loss']:.3f}", **{k: f"{row[k]:.4g}" for k in ("tau", "flip_rate") if k in row})
            window_loss.zero_()
            window_steps = 0
            clock.restart()
        with clock.paused():
            if evaluate is not None and tcfg.eval_every and (done % tcfg.eval_every == 0 or done == tcfg.steps):
                learner.set_learning(False)
                with phase("curve evaluation"):
                    scores = evaluate()
                learner.set_learning(True)
                history.evals.append({"step": done, "tokens": done * tokens_per_step, **scores})
                log.info("step %d: hard-mask perplexity %.3f", done, scores["perplexity"])
                if scalars is not None:
                    scalars(history.evals[-1], done, "eval")
            if done % tcfg.checkpoint_every == 0 or done == tcfg.steps:
                with phase("checkpoint"):
                    _save(checkpoint_root, done, learner, backend, stream, history, tcfg.keep_checkpoints)
    bar.close()
    learner.set_learning(False)
    return history


def log_row(done: int, tokens_per_step: int, loss: float, values: dict[str, float], seconds: float,
            steps: int) -> dict[str, float]:
    """One history row: the window's mean loss, the method's schedule and statistics, throughput."""
    return {"step": done, "tokens": done * tokens_per_step, "loss": loss, **values,
            "seconds_per_step": seconds / steps, "tokens_per_second": tokens_per_step * steps / seconds}


def _check_finite(loss: torch.Tensor, step: int, checkpoint_root: Path, lr_keys: str) -> None:
    if not torch.isfinite(loss):
        raise NonFiniteError(
            f"non-finite loss at step {step}; the last good checkpoint in {checkpoint_root} is intact "
            f"(lower {lr_keys} or check the data and weights, then --resume)"
        )


def _save(root: Path, step: int, learner: Learner, backend: Backend, stream, history: History, keep: int) -> None:
    shared: Optional[dict[str, Any]] = None
    state = learner.state(backend)  # every rank: gathers are collective
    if backend.is_main:
        shared = {**state, "history": {"logs": history.logs, "evals": history.evals}}
        if history.start_masks is not None:
            shared["start_masks"] = history.start_masks
    mine = {"optimizer": backend.optimizer_state(), "stream": stream.state_dict(), "rng": rng_state(),
            **learner.rank_state()}
    save_checkpoint(root, step, backend.rank, shared, mine, backend.barrier, keep,
                    write_files=lambda folder: learner.save_streamed(folder, backend))
