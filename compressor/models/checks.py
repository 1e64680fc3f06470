"""Sanity checks on loaded weights, so that bad input fails before hours of work, naming the tensor."""

from __future__ import annotations

import torch
from torch import nn

from compressor.errors import NonFiniteError


def assert_finite_weights(model: nn.Module, prefix: str = "") -> None:
    for name, param in model.named_parameters(prefix=prefix):
        if param.device.type == "meta":
            continue
        if not torch.isfinite(param).all():
            bad = int((~torch.isfinite(param)).sum())
            raise NonFiniteError(
                f"weight {name} holds {bad} NaN/inf values; the checkpoint is corrupt or was saved from a "
                "diverged run - repair or re-export it before compressing"
            )
