"""Schedules over optimizer steps: Gumbel temperature tau, logit scale kappa, regulariser weight lambda."""

from __future__ import annotations

import math
from typing import Literal

from compressor.config.base import StrictModel


class Schedule(StrictModel):
    """``start`` at step 0, ``end`` at the last step, in between linear or cosine (``constant``: ``start``)."""

    start: float
    end: float
    kind: Literal["linear", "cosine", "constant"] = "linear"

    @classmethod
    def constant(cls, value: float) -> "Schedule":
        return cls(start=value, end=value, kind="constant")

    def value_at(self, step: int, total_steps: int) -> float:
        """Value at ``step`` (0-based) of a run of ``total_steps``; steps past the end give ``end``."""
        if total_steps < 1:
            raise ValueError(f"a schedule needs total_steps >= 1, got {total_steps}")
        if step < 0:
            raise ValueError(f"schedule step must be >= 0, got {step}")
        if self.kind == "constant":
            return self.start
        if total_steps == 1:
            return self.start
        frac = min(step / (total_steps - 1), 1.0)
        if self.kind == "cosine":
            # Half a cosine: flat at both ends, fastest change mid-run.
            frac = 0.5 * (1.0 - math.cos(math.pi * frac))
        return self.start + (self.end - self.start) * frac


def schedule_at(cfg, step: int, total: int) -> tuple[float, float, float]:
    """(tau, kappa, lambda) of a ``MaskLLMConfig`` for ``step`` of ``total``."""
    return cfg.tau.value_at(step, total), cfg.kappa.value_at(step, total), cfg.regularizer.value_at(step, total)
