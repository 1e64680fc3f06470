"""MaskLLM on the learner interface: Gumbel-Softmax masks over N:M patterns, weights frozen or trained
(``maskllm.train_weights``), on one process or DeepSpeed ZeRO 0-3."""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional

import torch
from torch import nn

from compressor.checkpoints.logits import load_logits, logits_levels, save_logits
from compressor.checkpoints.streaming import stream_safetensors
from compressor.errors import CheckpointError, ConfigError
from compressor.methods.maskllm import (
    attach_masks, hold_samples, mask_memory_bytes, mask_stats, mask_train, prior_agreement, remove_masks,
    set_schedule_state, sparse_weight_regularizer, step_surrogate, store_frozen_weights,
)
from compressor.methods.maskllm.attach import _prior_for, layer_agreement, pattern_ids
from compressor.methods.maskllm.config import MaskLLMConfig
from compressor.methods.maskllm.gumbel import hard_mask
from compressor.methods.maskllm.schedules import schedule_at
from compressor.precision import Precision
from compressor.sparsity import NM, pack_bits
from compressor.training.backends import Backend
from compressor.training.learners.base import FinalModel, Learner
from compressor.training.zero3 import write_outputs_by_layer
from compressor.utils.logging import get_logger

log = get_logger(__name__)
# ZeRO-3 checkpoint files of state written a layer at a time (Learner.save_streamed)
STREAMED_LOGITS, STREAMED_WEIGHTS = "logits.safetensors", "weights.safetensors"


def maskllm_log_values(schedule: tuple[float, float, float], stats: Mapping[str, float]) -> dict[str, float]:
    """The log row entries of a MaskLLM step: its schedule and the mask statistics."""
    tau, kappa, lam = schedule
    return {"tau": tau, "kappa": kappa, "lambda": lam, "max_prob": stats["max_prob"], "flip_rate": stats["flip_rate"]}


def gathered_layers(masks: dict[str, Any], backend: Backend, write: bool = False,
                    weights: Optional[Mapping[str, torch.Tensor]] = None) -> Iterator[tuple[str, Any]]:
    """(name, mask) with that mask's logits (and its weight in ``weights``, if given) whole, one layer at
    a time (ZeRO-3 gathers and re-partitions each in turn: every rank must run the whole loop).
    ``write``: keep in-place changes to them."""
    for name, m in masks.items():
        params = [m.logits] + ([weights[name]] if weights is not None else [])
        with backend.gathered(params, write=write):
            yield name, m


class MaskLLMLearner(Learner):
    kind = "maskllm"
    lr_keys = "maskllm.logits_lr (or maskllm.weight_lr)"

    def __init__(self, cfg: MaskLLMConfig, priors: Optional[Mapping[str, torch.Tensor]], seed: int,
                 init_logits: Optional[str] = None, precision: Precision = Precision(),
                 levels: Optional[Mapping[str, NM]] = None) -> None:
        self.cfg, self.priors, self.seed, self.init_logits = cfg, priors, seed, init_logits
        self.levels = levels  # module name -> N:M of a mixed plan; None: cfg.sparsity everywhere
        bf16 = precision.compute == "bfloat16"
        # bf16 products: frozen weights are held in bf16 (half the memory; the products read them in bf16
        # anyway), while samples stay float32 so that G and the logits' gradient are formed in float32
        self.frozen_dtype = torch.bfloat16 if bf16 and not cfg.train_weights else None
        self.sample_dtype = torch.float32 if bf16 else None
        self.per_step = cfg.sample_every == "step"  # one sample held for all micro-batches of a step
        self.schedule = (0.0, 0.0, 0.0)
        self.agreement: Optional[float] = None
        self.memory: dict[str, float] = {}
        self.by_layer = False

    def attach(self, model: nn.Module, names: list[str], backend: Optional[Backend] = None) -> list[dict]:
        self.model = model
        # ZeRO-3 from construction on: logits made partitioned, priors and transfer logits one layer at a time
        self.by_layer = backend is not None and backend.partitioned_load
        if self.by_layer:
            self.masks = self._attach_by_layer(model, names, backend)
        else:
            self.masks = attach_masks(model, names, self.cfg, self.priors, seed=self.seed, levels=self.levels)
        # the weight each mask multiplies (trained with maskllm.train_weights)
        if self.frozen_dtype is not None:
            store_frozen_weights(model, self.masks, self.frozen_dtype)
        self.weights = {n: model.get_submodule(n).parametrizations.weight.original for n in self.masks}
        if self.init_logits and not self.by_layer:
            _load_transfer_logits(self.masks, self.init_logits)
        if self.priors is not None and not self.by_layer:
            self.agreement = prior_agreement(self.masks, self.priors)
        if self.agreement is not None:
            (log.warning if self.agreement < 0.99 else log.info)(
                "the initial hard mask keeps the prior's pattern in %.2f%% of groups%s", 100 * self.agreement,
                "; raise maskllm.prior_strength to start from the prior itself" if self.agreement < 0.99 else "")
        self.memory = mask_memory_bytes(self.masks)
        groups = [{"params": [m.logits for m in self.masks.values()], "lr": self.cfg.logits_lr}]
        if self.cfg.train_weights:
            groups.append({"params": list(self.weights.values()), "lr": self.cfg.weight_lr})
        return groups

    def _attach_by_layer(self, model: nn.Module, names: list[str], backend: Backend):
        """``attach_masks`` on a partitioned model: each layer's prior (a function of its gathered weight, or a
        mask read from a file), transfer logits and prior agreement while that layer alone is whole."""
        counts, last = [0, 0], {}
        priors = self.priors
        if priors is not None:
            source = priors

            def priors(name: str, weight: torch.Tensor) -> torch.Tensor:
                last[name] = source(name, weight) if callable(source) else _prior_for(source, name)
                return last[name]

        transfer = _TransferLogits(self.init_logits) if self.init_logits else None

        def on_layer(name: str, m, weight: torch.Tensor) -> None:
            if transfer is not None:
                m.load_logits(transfer.get(f"{name}.weight"), what=f"{name}.weight")
            if name in last:
                same, total = layer_agreement(m, last.pop(name))
                counts[0], counts[1] = counts[0] + same, counts[1] + total

        masks = attach_masks(model, names, self.cfg, priors, seed=self.seed, levels=self.levels, sharding=backend,
                             on_layer=on_layer)
        if self.priors is not None:
            self.agreement = counts[0] / max(counts[1], 1)
        return masks

    def backward_calls(self, grad_accum: int) -> int:
        return 1 if self.per_step else grad_accum  # one surrogate per step with held samples

    # -- one optimizer step -------------------------------------------------------------------------
    def begin_step(self, step: int, total: int) -> dict[str, float]:
        self.schedule = schedule_at(self.cfg, step, total)
        tau, kappa, lam = self.schedule
        set_schedule_state(self.masks, tau, kappa)
        if self.per_step:
            hold_samples(self.model, self.masks, dtype=self.sample_dtype)
        return {"tau": tau, "kappa": kappa, "lambda": lam}

    def micro_loss(self, objective: torch.Tensor) -> torch.Tensor:
        lam = self.schedule[2]
        if self.per_step or lam <= 0:  # with held samples the regulariser is in the step's surrogate
            return objective
        # subtracting the kept weights' energy rewards masks that keep large weights
        return objective - lam * sparse_weight_regularizer(self.masks)

    def backward(self, loss: torch.Tensor, backend: Backend, grad_accum: int) -> None:
        if self.per_step:  # gradients collect on the held samples; the logits get them once, in step_loss
            (loss / grad_accum).backward()
        else:
            backend.backward(loss)

    def step_loss(self) -> Optional[torch.Tensor]:
        return step_surrogate(self.masks, self.schedule[2]) if self.per_step else None

    # -- evaluation and statistics ------------------------------------------------------------------
    def set_learning(self, learning: bool) -> None:
        mask_train(self.masks, learning)

    def start(self, backend: Backend) -> None:
        self.prev_argmax = {n: pattern_ids(m.argmax_patterns()) for n, m in gathered_layers(self.masks, backend)}

    def stats(self, backend: Backend) -> dict[str, float]:
        current: dict[str, torch.Tensor] = {}
        stats = mask_stats(gathered_layers(self.masks, backend), self.prev_argmax, current)
        self.prev_argmax = current
        return {"max_prob": stats["max_prob"], "flip_rate": stats["flip_rate"]}

    def hard_masks(self, backend: Backend) -> dict[str, torch.Tensor]:
        return {f"{n}.weight": m.hard_mask().cpu() for n, m in gathered_layers(self.masks, backend) if backend.is_main}

    def packed_hard_masks(self, backend: Backend) -> dict[str, torch.Tensor]:
        return {f"{n}.weight": pack_bits(m.hard_mask().cpu())
                for n, m in gathered_layers(self.masks, backend) if backend.is_main}

    # -- checkpoints --------------------------------------------------------------------------------
    def gathered_logits(self, backend: Backend) -> dict[str, torch.Tensor]:
        """{name: a copy of the whole logits} on rank 0 ({} elsewhere); every rank takes part in the gathers."""
        return {n: m.logits.detach().clone() for n, m in gathered_layers(self.masks, backend) if backend.is_main}

    def state(self, backend: Backend) -> dict[str, Any]:
        if self.by_layer:
            return {}  # the logits (and trained weights) go into save_streamed's files, a layer at a time
        state: dict[str, Any] = {"logits": self.gathered_logits(backend)}
        if self.cfg.train_weights:  # trained weights are state too (ZeRO-1/2 also restore them from the optimizer)
            state["weights"] = {n: self.weights[n].detach().clone()
                                for n, _ in gathered_layers(self.masks, backend, weights=self.weights) if backend.is_main}
        return state if backend.is_main else {}

    def rank_state(self) -> dict[str, Any]:
        return {"mask_rng": {n: m.generator.get_state() for n, m in self.masks.items()}}

    @torch.no_grad()
    def load_state(self, shared: dict[str, Any], mine: dict[str, Any], backend: Backend) -> None:
        weights = shared.get("weights")
        gather = self.weights if weights is not None else None
        if not self.by_layer:  # by layer: the logits (and weights) come from load_streamed's files
            for name, m in gathered_layers(self.masks, backend, write=True, weights=gather):
                m.logits.copy_(shared["logits"][name])
                if weights is not None:
                    self.weights[name].copy_(weights[name])
        for name, m in self.masks.items():
            m.generator.set_state(mine["mask_rng"][name])

    def _streamed(self) -> dict[str, dict[str, torch.Tensor]]:
        """The files ``save_streamed`` writes: {file: {module name: its tensor}}."""
        files = {STREAMED_LOGITS: {n: m.logits for n, m in self.masks.items()}}
        if self.cfg.train_weights:
            files[STREAMED_WEIGHTS] = self.weights
        return files

    def save_streamed(self, folder: Path, backend: Backend) -> None:
        if not self.by_layer:
            return
        for file, tensors in self._streamed().items():
            entries = [(n, t.dtype, tuple(backend.full_shape(t))) for n, t in tensors.items()]
            with stream_safetensors(folder / file, entries) if backend.is_main else nullcontext() as write:
                for name, t in tensors.items():
                    with backend.gathered([t]):
                        if write is not None:
                            write(name, t.detach())

    @torch.no_grad()
    def load_streamed(self, folder: Path, backend: Backend) -> None:
        if not self.by_layer:
            return
        from safetensors import safe_open

        for file, tensors in self._streamed().items():
            if not (folder / file).is_file():
                raise CheckpointError(f"{folder} has no {file}: it was not written by a ZeRO-3 run with "
                                      "deepspeed.zero3_partitioned_load; resume with the settings it was made with")
            with safe_open(str(folder / file), framework="pt") as fh:
                for name, t in tensors.items():
                    with backend.gathered([t], write=True):
                        if backend.is_main:
                            t.copy_(fh.get_tensor(name))

    # -- the end ------------------------------------------------------------------------------------
    def finish(self, backend: Backend) -> FinalModel:
        if self.by_layer:  # masks stay attached (the final evaluation runs on them); the runner streams the files
            return FinalModel(masks=None, by_layer=lambda out, **kw: write_outputs_by_layer(
                out, self.model, self.masks, backend, logits_sparsity=self.cfg.sparsity, mixed=self.levels is not None,
                **kw))
        logits = {f"{n}.weight": t.float() for n, t in self.gathered_logits(backend).items()}
        # the hard masks are the logits' argmax patterns: no second gather
        hard = {name: hard_mask(t, self.masks[name[: -len(".weight")]].patterns) for name, t in logits.items()}
        # ZeRO-3 keeps the masks attached (their hard mode computes the same W * hard mask for the final
        # evaluation) and rank 0 writes the baked weights it gathers layer by layer.
        state = _baked_state_dict(self.model, self.masks, backend) if backend.partitioned else None
        if not backend.partitioned:
            remove_masks(self.model, bake=True)
        nm = self.cfg.sparsity
        levels = None if self.levels is None else {f"{n}.weight": m.nm for n, m in self.masks.items()}
        return FinalModel(masks=hard if backend.is_main else None, state_dict=state,
                          files={"logits": ("logits.safetensors", lambda path: save_logits(path, logits, nm, levels))})

    def report(self) -> dict[str, Any]:
        return {"memory_per_masked_weight": self.memory, "prior_agreement": self.agreement}


@torch.no_grad()
def _baked_state_dict(model: nn.Module, masks: dict[str, Any], backend: Backend) -> Optional[dict[str, torch.Tensor]]:
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


class _TransferLogits:
    """An earlier run's logits read one layer at a time."""

    def __init__(self, path: str) -> None:
        from safetensors import safe_open

        self.path = Path(path) / "logits.safetensors" if Path(path).is_dir() else Path(path)
        logits_levels(self.path)  # a logits file, checked
        self._fh = safe_open(str(self.path), framework="pt")

    def get(self, key: str) -> torch.Tensor:
        if key not in self._fh.keys():
            raise ConfigError(f"init_logits {self.path} has no logits for {key}")
        return self._fh.get_tensor(key)


def _load_transfer_logits(masks: dict[str, Any], path: str) -> None:
    logits = load_logits(Path(path) / "logits.safetensors" if Path(path).is_dir() else path)
    for name, m in masks.items():
        key = f"{name}.weight"
        if key not in logits:
            raise ConfigError(f"init_logits {path} has no logits for {key}")
        m.load_logits(logits[key], what=key)
