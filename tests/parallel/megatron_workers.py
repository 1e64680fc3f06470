"""Spawned megatron-core ranks for the tests/parallel/test_megatron_*.py tests (gloo, CPU).

Each test starts fresh processes: megatron's parallel state and the process group are global and must
not leak between tests. Workers are module-level functions (spawn pickles them by reference); rank 0
writes what the test checks to ``result.pt`` in the test's folder.
"""

from __future__ import annotations

import os
import socket
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
import torch.multiprocessing as mp

from tests.factories import TINY_DIMS


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, fn: Callable[..., Any], args: tuple) -> None:
    warnings.filterwarnings("ignore")
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)  # two cores shared by every rank
    fn(*args)


def run_ranks(fn: Callable[..., Any], world: int, *args: Any, timeout: float = 240.0) -> None:
    """Run ``fn(*args)`` in ``world`` spawned ranks; re-raise a rank's error; kill all after ``timeout``."""
    ctx = mp.start_processes(_entry, args=(world, free_port(), fn, args), nprocs=world, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=1.0):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            raise TimeoutError(f"{world} megatron ranks did not finish within {timeout:.0f} s")


def save_tiny_hf(folder: Path, tied: bool, vocab: int = 96, seed: int = 0, model_type: str = "llama",
                 **dims: int) -> Path:
    """A random tiny LLaMA (or Qwen2: with q/k/v biases) with TP-friendly heads and no tokenizer: enough
    for model-only tests."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type, vocab_size=vocab, tie_word_embeddings=tied, rope_theta=5000.0,
                                  **{**TINY_DIMS, "max_position_embeddings": 128, **dims})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():  # norms start at 1 and biases at 0: perturb them so their mapping matters
            p.add_(torch.randn_like(p) * 0.02)
    model.save_pretrained(folder)
    return folder


def setup(tp: int, pp: int, folder: str, dtype: torch.dtype = torch.float32):
    """Process group, parallel state, this stage's model with the HF weights: (model, dims, layout, get)."""
    from compressor.parallel.megatron_model import (
        build_gpt_model, init_distributed, init_model_parallel, load_hf_weights, open_hf_folder,
    )

    init_distributed()
    layout = init_model_parallel(tp, pp)
    _, dims, get = open_hf_folder(folder)
    model = build_gpt_model(dims, layout, dtype)
    load_hf_weights(model, get, dims, layout)
    return model, dims, layout, get


def teardown() -> None:
    import torch.distributed as dist

    from compressor.parallel.megatron_model import destroy_model_parallel

    destroy_model_parallel()
    dist.destroy_process_group()


def save_result(out: str, value: Any) -> None:
    import torch.distributed as dist

    if dist.get_rank() == 0:
        torch.save(value, Path(out) / "result.pt")


# -- workers ---------------------------------------------------------------------------------------
def state_dict_and_logits(folder: str, out: str, tp: int, pp: int, ids: torch.Tensor) -> None:
    """Every rank's megatron state dict, and the last stage's (TP-gathered) output logits for ``ids``."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from compressor.parallel.megatron_model import megatron_state_dict

    model, dims, layout, _ = setup(tp, pp, folder)
    model.eval()
    states: list = [None] * dist.get_world_size()
    dist.all_gather_object(states, ((layout.tp_rank, layout.pp_rank), megatron_state_dict(model)))
    logits = None
    if pp == 1:
        positions = torch.arange(ids.shape[1]).unsqueeze(0).expand_as(ids)
        with torch.no_grad():
            local = model(ids, positions, attention_mask=None)  # (B, T, vocab / tp)
            logits = gather_from_tensor_model_parallel_region(local, group=ps.get_tensor_model_parallel_group())
    save_result(out, {"states": dict(states), "logits": logits})
    teardown()


SAMPLE_MODES = ("micro_batch", "step")


def count_draws(mask, start: torch.Tensor, limit: int = 8) -> int:
    """Gumbel samples ``mask`` drew since its generator was in state ``start`` (-1: more than ``limit``)."""
    from compressor.methods.maskllm.gumbel import sample_gumbel

    replay = torch.Generator().set_state(start)
    for draws in range(limit + 1):
        if torch.equal(replay.get_state(), mask.generator.get_state()):
            return draws
        sample_gumbel(mask.logits.shape, replay)
    return -1


def masked_step(folder: str, out: str, tp: int, pp: int, windows: torch.Tensor, n_mb: int, tau: float, kappa: float,
                lam: float, seed: int) -> None:
    """Initial logits; per ``sample_every`` mode the Gumbel draws of one noisy step and the noise-free soft-mask
    loss and gradients; the hard-mask loss. Tensors are gathered in HF names.

    ``windows`` (DP * n_mb, B, T): data-parallel rank d runs micro-batches d * n_mb ... (d + 1) * n_mb - 1.
    """
    from compressor.methods.maskllm import MaskLLMConfig, mask_train, set_noise, set_schedule_state
    from compressor.parallel.megatron_masks import as_mask_dict, attach_sharded_masks, gather_hf
    from compressor.parallel.megatron_train import forward_backward, global_loss, step_gradients

    model, dims, layout, _ = setup(tp, pp, folder)
    masks = attach_sharded_masks(model, dims, layout, MaskLLMConfig(sparsity="2:4"), seed=seed)
    initial = gather_hf(masks, dims, layout, lambda m: m.logits.detach())
    mine = list(windows[layout.dp_rank * n_mb: (layout.dp_rank + 1) * n_mb])

    plain = as_mask_dict(masks)
    set_schedule_state(plain, tau, kappa)
    model.train()
    draws: dict[str, list[int]] = {}
    for mode in SAMPLE_MODES:  # with noise: how many samples each mask draws in one step
        states = {n: m.generator.get_state() for n, m in plain.items()}
        step_gradients(model, masks, mine, lam, layout, mode)
        counts = sorted({count_draws(m, states[n]) for n, m in plain.items()})
        gathered: list = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(gathered, counts)
        draws[mode] = sorted({c for rank in gathered for c in rank})
        for m in plain.values():
            m.logits.grad = None

    set_noise(plain, False)  # soft masks softmax(kappa * logits / tau): the same in every layout
    soft_loss, grads = {}, {}
    for mode in SAMPLE_MODES:
        soft_loss[mode] = global_loss(step_gradients(model, masks, mine, lam, layout, mode), layout)
        grads[mode] = gather_hf(masks, dims, layout, lambda m: m.logits.grad.clone())
        for m in plain.values():
            m.logits.grad = None

    model.eval()
    mask_train(plain, False)
    with torch.no_grad():
        hard_loss = global_loss(forward_backward(model, masks, mine, forward_only=True), layout)
    hard = gather_hf(masks, dims, layout, lambda m: m.hard_mask())
    save_result(out, {"initial": initial, "draws": draws, "soft_loss": soft_loss, "grads": grads,
                      "hard_loss": hard_loss, "hard": hard, "layout": (layout.tp_size, layout.pp_size, layout.dp_size)})
    teardown()


def bf16_step(folder: str, out: str, tp: int, windows: torch.Tensor, tau: float, kappa: float, lam: float, seed: int,
              hardware: str) -> None:
    """One noise-free MaskLLM step of a bf16 megatron model as if this host's bf16 path were ``hardware``
    ("none": the float32 emulation; anything else: torch's own bf16 kernels): loss, the logits' gradients
    in HF names, and how many operands the emulation rounded (0 when it was not entered)."""
    import compressor.precision as precision
    from compressor.methods.maskllm import MaskLLMConfig, set_noise, set_schedule_state
    from compressor.parallel.megatron_masks import as_mask_dict, attach_sharded_masks, gather_hf
    from compressor.parallel.megatron_train import global_loss, step_gradients

    rounded = [0]
    to_float32 = precision._float32_of_bf16

    def counting(x):
        rounded[0] += isinstance(x, torch.Tensor) and x.is_floating_point()
        return to_float32(x)

    precision.bf16_hardware = lambda device="cpu": hardware
    precision._float32_of_bf16 = counting
    model, dims, layout, _ = setup(tp, 1, folder, torch.bfloat16)
    masks = attach_sharded_masks(model, dims, layout, MaskLLMConfig(sparsity="2:4"), seed=seed)
    plain = as_mask_dict(masks)
    set_schedule_state(plain, tau, kappa)
    set_noise(plain, False)
    model.train()
    loss = global_loss(step_gradients(model, masks, list(windows), lam, layout, "step"), layout)
    grads = gather_hf(masks, dims, layout, lambda m: m.logits.grad.float().clone())
    save_result(out, {"loss": loss, "grads": grads, "rounded": rounded[0],
                      "dtypes": {p.dtype for p in model.parameters()}})
    teardown()


def checkpoint_save(folder: str, out: str, tp: int, pp: int, windows: torch.Tensor, seed: int) -> None:
    """Attach masks, take one AdamW step on a noisy soft-mask loss, save a distributed checkpoint."""
    from compressor.methods.maskllm import MaskLLMConfig, set_schedule_state
    from compressor.parallel import megatron_checkpoint as ckpt
    from compressor.parallel.megatron_masks import as_mask_dict, attach_sharded_masks, gather_hf
    from compressor.parallel.megatron_train import allreduce_logit_grads, forward_backward
    from compressor.training.backends import adamw

    model, dims, layout, _ = setup(tp, pp, folder)
    masks = attach_sharded_masks(model, dims, layout, MaskLLMConfig(sparsity="2:4"), seed=seed)
    optimizer = adamw([{"params": [s.mask.logits for s in masks.values()], "lr": 0.05}])
    set_schedule_state(as_mask_dict(masks), 1.0, 100.0)
    model.train()
    forward_backward(model, masks, list(windows), 0.0)
    allreduce_logit_grads(masks, layout)
    optimizer.step()
    stream = _FakeStream({"position": 7})
    ckpt.save(Path(out) / "checkpoints", 1, masks, optimizer, stream, dims, layout, {"logs": [1], "evals": []})
    logits = gather_hf(masks, dims, layout, lambda m: m.logits.detach())
    exp_avg = gather_hf(masks, dims, layout, lambda m: optimizer.state[m.logits]["exp_avg"])
    save_result(out, {"logits": logits, "exp_avg": exp_avg})
    teardown()


def checkpoint_load(folder: str, out: str, tp: int, pp: int, seed: int) -> None:
    """Fresh masks (other random logits), then load the latest checkpoint: gathered logits and AdamW state."""
    from compressor.methods.maskllm import MaskLLMConfig
    from compressor.parallel import megatron_checkpoint as ckpt
    from compressor.parallel.megatron_masks import attach_sharded_masks, gather_hf
    from compressor.training.backends import adamw

    model, dims, layout, _ = setup(tp, pp, folder)
    masks = attach_sharded_masks(model, dims, layout, MaskLLMConfig(sparsity="2:4"), seed=seed + 1)
    before = gather_hf(masks, dims, layout, lambda m: m.logits.detach().clone())
    optimizer = adamw([{"params": [s.mask.logits for s in masks.values()], "lr": 1.0}])
    stream = _FakeStream({})
    step, history = ckpt.load(ckpt.latest_checkpoint(Path(out) / "checkpoints"), masks, optimizer, stream, dims,
                              layout)
    logits = gather_hf(masks, dims, layout, lambda m: m.logits.detach())
    exp_avg = gather_hf(masks, dims, layout, lambda m: optimizer.state[m.logits]["exp_avg"])
    save_result(out, {"before": before, "logits": logits, "exp_avg": exp_avg, "step": step, "history": history,
                      "stream": stream.state, "lr": optimizer.param_groups[0]["lr"]})
    teardown()


class _FakeStream:
    """The two methods of WindowStream a checkpoint uses."""

    def __init__(self, state: dict) -> None:
        self.state = state

    def state_dict(self) -> dict:
        return dict(self.state)

    def load_state_dict(self, state: dict) -> None:
        self.state = dict(state)


def train(cfg, out: str) -> None:
    """The real worker entry."""
    from compressor.parallel.megatron_train import train_rank

    train_rank(cfg, out)
