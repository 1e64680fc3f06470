"""What every weight rule (a parametrization of a linear's ``weight``) offers the trainer."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn


class WeightRule(nn.Module):
    """``forward(W)`` is the weight the layer computes with; ``hard_mask(W)`` the exact mask it ends with.

    Training mode gives the method's training weight (soft, straight-through, ...), eval mode W * hard
    mask. A rule whose mask follows the weights caches it until ``weights_changed()`` (the trainer calls
    it after each optimizer step and after loading weights), so every micro-batch of a step, and an
    evaluation right after it, sees the mask of the current weights.
    """

    def __init__(self, name: str = "layer") -> None:
        super().__init__()
        self.name = name
        self.track_penalty = False  # record ``penalty`` in training forwards (the trainer turns it on)
        # The method's regulariser of the latest training forward, a scalar the loss adds (or None).
        self.penalty: Optional[torch.Tensor] = None

    def hard_mask(self, weight: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def weights_changed(self) -> None:
        """The weights moved (an optimizer step, a load): a mask derived from them is out of date."""

    def train(self, mode: bool = True) -> "WeightRule":
        if not mode:
            self.penalty = None  # hold no graph while evaluating
        return super().train(mode)
