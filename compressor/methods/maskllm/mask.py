"""The learnable N:M mask as a parametrization of a module's ``weight`` (out, in).

Registered with ``torch.nn.utils.parametrize``, it wraps nn.Linear and megatron-core's
Column/RowParallelLinear alike: their forward reads ``self.weight`` and gets W * mask, so no layer
math changes. Soft (Gumbel-Softmax) masks while learning, the argmax pattern otherwise.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from compressor.errors import SparsityPatternError
from compressor.methods.maskllm.gumbel import gumbel_softmax_probs, hard_mask, pattern_overlap, soft_mask
from compressor.sparsity import NM, check_divisible, nm_patterns

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class NMMaskParametrization(nn.Module):
    def __init__(self, out_features: int, in_features: int, nm: NM, *, init_std: float = 0.01,
                 dtype: torch.dtype = torch.float32, seed: int = 0, name: str = "layer") -> None:
        super().__init__()
        check_divisible(in_features, nm.m, name)
        self.nm, self.name = nm, name
        self.shape = (out_features, in_features)
        patterns = nm_patterns(nm).float()  # (C, M)
        self.register_buffer("patterns", patterns, persistent=False)
        self.generator = torch.Generator().manual_seed(seed)
        init = torch.randn(out_features, in_features // nm.m, patterns.shape[0], generator=self.generator) * init_std
        self.logits = nn.Parameter(init.to(dtype))  # (out, G, C)
        self.tau, self.kappa = 4.0, 100.0
        self.hard = True  # argmax masks until the trainer switches to learning
        self.last_masked: Optional[torch.Tensor] = None  # W * mask of the latest forward (regulariser)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if self.hard:
            mask = hard_mask(self.logits, self.patterns).to(weight.dtype)
        else:
            probs = gumbel_softmax_probs(self.logits, self.tau, self.kappa, self.generator)  # (out, G, C)
            mask = soft_mask(probs, self.patterns).to(weight.dtype)  # (out, in)
        masked = weight * mask
        self.last_masked = None if self.hard else masked
        return masked

    # -- initialisation -------------------------------------------------------------------------
    def _check_shape(self, t: torch.Tensor, expected: tuple[int, ...], what: str) -> None:
        if tuple(t.shape) != tuple(expected):
            raise SparsityPatternError(f"{self.name}: {what} has shape {tuple(t.shape)}, expected {tuple(expected)}")

    @torch.no_grad()
    def init_from_prior(self, prior: torch.Tensor, strength: float) -> None:
        """Shift logits by strength * std(logits) * (overlap with the prior's group - N/2)."""
        self._check_shape(prior, self.shape, "prior mask")
        overlap = pattern_overlap(prior.bool(), self.patterns, self.nm.m)  # (out, G, C)
        std = self.logits.float().std()
        self.logits.copy_((self.logits.float() + strength * std * (overlap - self.nm.n / 2)).to(self.logits.dtype))

    @torch.no_grad()
    def load_logits(self, logits: torch.Tensor, what: str = "logits") -> None:
        """Start from an earlier run's logits (transfer to a new domain)."""
        self._check_shape(logits, tuple(self.logits.shape), what)
        self.logits.copy_(logits.to(self.logits.dtype))

    # -- inspection -----------------------------------------------------------------------------
    @torch.no_grad()
    def hard_mask(self) -> torch.Tensor:
        return hard_mask(self.logits, self.patterns)

    @torch.no_grad()
    def argmax_patterns(self) -> torch.Tensor:
        return self.logits.argmax(dim=-1)

    @torch.no_grad()
    def max_prob(self) -> torch.Tensor:
        """Mean over groups of the largest pattern probability of softmax(kappa * logits)."""
        return torch.softmax(self.kappa * self.logits.float(), dim=-1).max(dim=-1).values.mean()
