"""MaskLLM options (defaults: the published ones where the paper gives them)."""

from __future__ import annotations

from math import comb
from typing import Literal

from pydantic import Field, PositiveFloat, field_validator, model_validator

from compressor.config.base import StrictModel
from compressor.methods.maskllm.schedules import Schedule
from compressor.sparsity import NM

MAX_PATTERNS = 256  # logits per group; 4:8 has 70, 8:16 would have 12870


class MaskLLMConfig(StrictModel):
    sparsity: NM = NM(2, 4)
    tau: Schedule = Schedule(start=4.0, end=0.05)  # Gumbel-Softmax temperature
    kappa: Schedule = Schedule(start=100.0, end=500.0)  # logit scale
    regularizer: Schedule = Schedule(start=1e-5, end=0.0)  # lambda of the sparse-weight regulariser
    prior_strength: float = Field(3.0, ge=0)
    init_std: PositiveFloat = 0.01  # std of the random initial logits
    logits_dtype: Literal["float32", "bfloat16"] = "float32"
    logits_lr: PositiveFloat = 5e-3
    train_weights: bool = False  # also train the (masked) weights
    weight_lr: PositiveFloat = 1e-5

    @field_validator("sparsity", mode="before")
    @classmethod
    def _parse(cls, value):
        return NM.parse(value)

    @model_validator(mode="after")
    def _check(self) -> "MaskLLMConfig":
        n = comb(self.sparsity.m, self.sparsity.n)
        if n > MAX_PATTERNS:
            raise ValueError(f"{self.sparsity} has {n} patterns per group; MaskLLM supports at most {MAX_PATTERNS}")
        for name in ("tau", "kappa"):
            s = getattr(self, name)
            if min(s.start, s.end) <= 0:
                raise ValueError(f"{name} must stay positive, got start={s.start} end={s.end}")
        if min(self.regularizer.start, self.regularizer.end) < 0:
            raise ValueError("regularizer weights must be >= 0")
        return self
