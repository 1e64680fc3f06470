"""Options of the weight-training methods, one typed section each (``method:`` of `compressor learn`).

Every method trains the weights of the targeted linears (embeddings, norms and the LM head stay frozen)
with ``lr`` (AdamW, no weight decay) and ends with an exact mask of ``sparsity``.
"""

from __future__ import annotations

from math import isfinite
from typing import Literal

from pydantic import Field, PositiveFloat, model_validator

from compressor.config.base import SparsityField, StrictModel
from compressor.methods.maskllm.schedules import Schedule
from compressor.sparsity import NM


def _check_schedule(name: str, s: Schedule, positive: bool) -> None:
    low = min(s.start, s.end)
    if not (isfinite(s.start) and isfinite(s.end)) or (low <= 0 if positive else low < 0):
        bound = "> 0" if positive else ">= 0"
        raise ValueError(f"{name} must stay finite and {bound} over the run, got start={s.start} end={s.end}")


class WeightMethod(StrictModel):
    lr: PositiveFloat = 1e-5  # AdamW learning rate of the trained weights


class FixedMaskMethod(WeightMethod):
    """Train the kept weights of a one-shot mask (``prior``: a run folder, masks file or a one-shot method)."""

    kind: Literal["fixed_mask"] = "fixed_mask"
    sparsity: SparsityField = NM(2, 4)  # the prior's sparsity (N:M or unstructured)


class SRSTEMethod(WeightMethod):
    """SR-STE: magnitude N:M mask of the current weights every step, straight-through gradient, and the
    sparse-refined term lambda_w (1 - mask) * W in the gradient."""

    kind: Literal["srste"] = "srste"
    sparsity: NM = NM(2, 4)
    # constant by default (Zhou et al.: 2e-4); decaying: {start: 2.0e-4, end: 0.0, kind: cosine}
    lambda_w: Schedule = Schedule.constant(2e-4)

    @model_validator(mode="after")
    def _check(self) -> "SRSTEMethod":
        _check_schedule("lambda_w", self.lambda_w, positive=False)
        return self


class PDPMethod(WeightMethod):
    """PDP: soft mask sigmoid((w^2 - t^2) / tau) with tau = tau_rel x the layer's mean t^2, annealed;
    the mask ramps in over the first ``ramp_fraction`` of the steps; hard top-N mask at the end."""

    kind: Literal["pdp"] = "pdp"
    sparsity: SparsityField = NM(2, 4)  # N:M (threshold per group) or a fraction (threshold per layer)
    tau: Schedule = Schedule(start=0.1, end=0.005)  # tau_rel, relative to each layer's mean t^2
    # weight used = w * (1 - r (1 - m)), r from 0 to 1 over this fraction of the steps; 0: the full mask from step 0
    ramp_fraction: float = Field(0.25, ge=0.0, le=1.0)

    @model_validator(mode="after")
    def _check(self) -> "PDPMethod":
        _check_schedule("tau", self.tau, positive=True)
        return self

    def ramp_at(self, step: int, total: int) -> float:
        """r for ``step`` (0-based) of ``total``: linear from 0 at step 0 to 1 after ramp_fraction of the run."""
        span = self.ramp_fraction * max(total - 1, 1)
        return 1.0 if span == 0 else min(1.0, step / span)


class BDWPMethod(WeightMethod):
    """Bidirectional N:M: forward with W masked N:M along the input, input gradient with W masked N:M along
    the output, dense weight gradient; masks from the current weights every step."""

    kind: Literal["bdwp"] = "bdwp"
    sparsity: NM = NM(2, 4)
    # SR-STE's sparse-refined term on the forward mask (as SR-STE's default, so the two differ only in the
    # backward pass); 0 turns it off
    lambda_w: Schedule = Schedule.constant(2e-4)

    @model_validator(mode="after")
    def _check(self) -> "BDWPMethod":
        _check_schedule("lambda_w", self.lambda_w, positive=False)
        return self


class DenseMethod(WeightMethod):
    """The control arm: the same weights trained without any mask, on the same data. Ends dense (not N:M)."""

    kind: Literal["dense"] = "dense"
