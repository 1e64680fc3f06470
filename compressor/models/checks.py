"""Sanity checks on loaded weights, so that bad input fails before hours of work, naming the tensor."""

from __future__ import annotations

import torch
from torch import nn

from compressor.errors import NonFiniteError

FINITE_CHECK_CHUNK = 2**24  # elements per isfinite pass (memory: their float and bool temporaries)


def all_finite(tensor: torch.Tensor) -> bool:
    """No NaN or inf in ``tensor``, checked in chunks: ``isfinite`` of a whole tensor builds temporaries
    about twice its size (an embedding's check used to set a lazy prune's load peak)."""
    flat = tensor.detach().reshape(-1)
    return all(bool(torch.isfinite(part).all()) for part in flat.split(FINITE_CHECK_CHUNK))


def assert_finite_weights(model: nn.Module, prefix: str = "") -> None:
    for name, param in model.named_parameters(prefix=prefix):
        if param.device.type == "meta":
            continue
        if not all_finite(param):
            bad = int((~torch.isfinite(param)).sum())
            raise NonFiniteError(
                f"weight {name} holds {bad} NaN/inf values; the checkpoint is corrupt or was saved from a "
                "diverged run - repair or re-export it before compressing"
            )
