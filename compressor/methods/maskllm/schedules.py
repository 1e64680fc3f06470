"""Schedules over training steps (temperature tau, logit scale kappa, regulariser weight lambda)."""

from __future__ import annotations

import math
from typing import Literal

from compressor.config.base import StrictModel


class Schedule(StrictModel):
    start: float
    end: float
    kind: Literal["linear", "cosine", "constant"] = "linear"

    def value_at(self, step: int, total_steps: int) -> float:
        """Value at ``step`` of ``total_steps`` (``start`` at step 0, ``end`` at the last step)."""
        if self.kind == "constant" or total_steps <= 1:
            return self.start
        frac = min(max(step / (total_steps - 1), 0.0), 1.0)
        if self.kind == "cosine":
            frac = 0.5 * (1 - math.cos(math.pi * frac))
        return self.start + (self.end - self.start) * frac
