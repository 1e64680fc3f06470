"""The learner interface: what a training method does at each point of the one training loop.

The loop (``compressor.training.loop.train``) owns data, backends, checkpoints, schedules of steps,
logging, evaluation and the non-finite-loss stop; a learner owns the method. Per optimizer step the
loop calls, in this order:

    begin_step(step, total)      schedules; MaskLLM draws the soft-mask sample held for the step
    per micro-batch:             (one function of the loop: forward + loss + backward)
        micro_loss(objective)    the method's loss terms added to the micro-batch's objective
        backward(loss, ...)      through the backend's engine, or plain autograd onto held samples
    step_loss()                  a once-per-step term backpropagated through the engine (or None)
    <optimizer step>
    after_step()                 the weights moved: masks derived from them are out of date

and ``set_learning(False)`` / ``(True)`` around each evaluation (hard masks), ``stats`` at log
steps, ``state`` / ``rank_state`` / ``load_state`` for checkpoints (tensors, numbers, strings and
containers of them only: ``compressor.checkpoints.tree``), and ``finish`` at the end: the exact
model (weights x hard mask) and its masks.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn

from compressor.methods.sparse_training.flops import PassDensities
from compressor.training.backends import Backend


@dataclass
class FinalModel:
    """What a learner ends with (on rank 0; other ranks get ``masks`` None)."""

    # {weight name: (out, in) bool} of the exact sparse model, None for a dense result (the control)
    masks: Optional[dict[str, torch.Tensor]]
    # the state dict to save (ZeRO-3: gathered by rank 0), or None: the model's own, already baked
    state_dict: Optional[dict[str, torch.Tensor]] = None
    # further outputs: {report key: (file name, writer(path))}, e.g. MaskLLM's logits.safetensors
    files: dict[str, tuple[str, Callable[[Path], None]]] = field(default_factory=dict)
    # ZeRO-3 with a partitioned load: nothing above is assembled; instead ``by_layer(out, **options)`` (every
    # rank calls it) writes model/, the masks and the method's files one layer at a time and returns the
    # report's mask checks (``compressor.training.zero3.write_outputs_by_layer``)
    by_layer: Optional[Callable[..., dict[str, Any]]] = None


class Learner(ABC):
    kind: str
    lr_keys: str = "the learning rate"  # named by the non-finite-loss error
    # the dtype frozen weights are held in while training (None: as loaded); the final model is then
    # baked from the source's weights, not from these copies
    frozen_dtype: Optional[torch.dtype] = None

    # -- attach -----------------------------------------------------------------------------------
    @abstractmethod
    def attach(self, model: nn.Module, names: list[str], backend: Optional[Backend] = None) -> list[dict]:
        """Make the named linears (module names) train the method's way, freeze every other parameter,
        and return the optimizer's parameter groups. ``backend``: where the parameters live (a ZeRO-3 backend
        with ``partitioned_load`` hands over a partitioned model)."""

    def backward_calls(self, grad_accum: int) -> int:
        """Backward calls through the backend per optimizer step (its gradient accumulation)."""
        return grad_accum

    def gemm_densities(self) -> PassDensities:
        """Fractions of dense GEMM work in the forward, input-gradient and weight-gradient products."""
        return PassDensities.dense()

    # -- one optimizer step -------------------------------------------------------------------------
    def begin_step(self, step: int, total: int) -> dict[str, float]:
        """Set this step's schedule values (returned for the log) and prepare the step's forwards."""
        return {}

    def micro_loss(self, objective: torch.Tensor) -> torch.Tensor:
        """The loss a micro-batch backpropagates: its objective plus the method's terms."""
        return objective

    def backward(self, loss: torch.Tensor, backend: Backend, grad_accum: int) -> None:
        backend.backward(loss)

    def step_loss(self) -> Optional[torch.Tensor]:
        """A term backpropagated once per step through the backend, after the micro-batches."""
        return None

    def after_step(self) -> None:
        """After the optimizer step."""

    # -- evaluation and statistics ------------------------------------------------------------------
    @abstractmethod
    def set_learning(self, learning: bool) -> None:
        """Training forwards (soft / straight-through masks) or evaluation forwards (hard masks)."""

    def start(self, backend: Backend) -> None:
        """Before the first step of this process (fresh or resumed): the reference of ``stats``."""

    def stats(self, backend: Backend) -> dict[str, float]:
        """Statistics for the log since the previous call (e.g. the mask flip rate); every rank calls it."""
        return {}

    @abstractmethod
    def hard_masks(self, backend: Backend) -> Optional[dict[str, torch.Tensor]]:
        """{weight name: bool mask} of the current hard masks on rank 0 ({} elsewhere; every rank takes
        part), or None for a method without masks."""

    def packed_hard_masks(self, backend: Backend) -> Optional[dict[str, torch.Tensor]]:
        """``hard_masks`` packed to bits (``compressor.sparsity.pack_bits``): what the loop keeps of step 0."""
        from compressor.sparsity import pack_bits

        masks = self.hard_masks(backend)
        return None if masks is None else {n: pack_bits(m) for n, m in masks.items()}

    # -- checkpoints --------------------------------------------------------------------------------
    @abstractmethod
    def state(self, backend: Backend) -> dict[str, Any]:
        """What rank 0 saves for all ranks (every rank calls it: ZeRO-3 gathers are collective)."""

    def rank_state(self) -> dict[str, Any]:
        """What each rank saves for itself (e.g. its noise generators)."""
        return {}

    @abstractmethod
    def load_state(self, shared: dict[str, Any], mine: dict[str, Any], backend: Backend) -> None: ...

    def save_streamed(self, folder: Path, backend: Backend) -> None:
        """Write state too large to assemble on one rank into files of the checkpoint ``folder``, a layer
        at a time (every rank calls it; rank 0 writes). Nothing by default."""

    def load_streamed(self, folder: Path, backend: Backend) -> None:
        """Read back what ``save_streamed`` wrote (after ``load_state``)."""

    # -- the end ------------------------------------------------------------------------------------
    @abstractmethod
    def finish(self, backend: Backend) -> FinalModel:
        """Bake the exact sparse model (every rank calls it)."""

    def report(self) -> dict[str, Any]:
        """Method-specific entries of report.json."""
        return {}
