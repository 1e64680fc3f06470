"""MaskLLM options; defaults follow the paper (Fang et al. 2024) where it gives them."""

from __future__ import annotations

from math import comb, isfinite
from typing import Literal

from pydantic import Field, PositiveFloat, model_validator

from compressor.config.base import StrictModel
from compressor.methods.maskllm.schedules import Schedule
from compressor.sparsity import NM

# One logit per keep-pattern and group: 2:4 has 6 (1.5 per weight), 4:8 has 70 (8.75 per weight);
# 8:16 would need 12870 per 16 weights, far more memory than the model itself.
MAX_PATTERNS = 256


def check_pattern_count(nm: NM) -> int:
    """C(M, N), or a ValueError when it is too many logits per group to learn."""
    count = comb(nm.m, nm.n)
    if count > MAX_PATTERNS:
        raise ValueError(
            f"sparsity {nm} has C({nm.m},{nm.n}) = {count} keep-patterns per group; MaskLLM learns one logit "
            f"per pattern and supports at most {MAX_PATTERNS} (2:4 has 6, 2:8 has 28, 4:8 has 70): choose a smaller M"
        )
    return count


class MaskLLMConfig(StrictModel):
    sparsity: NM = NM(2, 4)  # "2:4", [2, 4] or {n: 2, m: 4}
    tau: Schedule = Schedule(start=4.0, end=0.05)  # Gumbel-Softmax temperature
    kappa: Schedule = Schedule(start=100.0, end=500.0)  # logit scale: samples use kappa * logits
    regularizer: Schedule = Schedule(start=1e-5, end=0.0)  # lambda: loss -= lambda * sum ||W * mask||^2
    prior_strength: float = Field(3.0, ge=0)  # prior offset in units of std(logits); 0 = ignore the prior
    init_std: PositiveFloat = 0.01  # std of the random initial logits
    logits_dtype: Literal["float32", "bfloat16"] = "float32"  # also the dtype of their AdamW state
    logits_lr: PositiveFloat = 5e-3
    # "step": one Gumbel sample per optimizer step, shared by its micro-batches (sampling and its
    # backward run once per step); "micro_batch": a fresh sample for every forward pass.
    sample_every: Literal["step", "micro_batch"] = "step"
    train_weights: bool = False  # also train the masked weights (otherwise every model weight is frozen)
    weight_lr: PositiveFloat = 1e-5

    @model_validator(mode="after")
    def _check(self) -> "MaskLLMConfig":
        check_pattern_count(self.sparsity)
        for name in ("tau", "kappa"):
            s: Schedule = getattr(self, name)
            if not (isfinite(s.start) and isfinite(s.end) and min(s.start, s.end) > 0):
                raise ValueError(f"{name} must stay finite and > 0 over the run, got start={s.start} end={s.end}")
        r = self.regularizer
        if not (isfinite(r.start) and isfinite(r.end) and min(r.start, r.end) >= 0):
            raise ValueError(f"regularizer (lambda) must stay finite and >= 0, got start={r.start} end={r.end}")
        return self
