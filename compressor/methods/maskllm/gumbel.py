"""Gumbel-Softmax over N:M keep-patterns (pure tensor functions).

Each group of M weights owns logits over the C(M,N) patterns (rows of ``nm_patterns``). Training
samples a soft choice, softmax((kappa * logits + Gumbel noise) / tau), and mixes the patterns with it;
evaluation takes the argmax pattern.
"""

from __future__ import annotations

from typing import Optional

import torch

_EPS = 1e-10


def sample_gumbel(shape: torch.Size | tuple[int, ...], generator: Optional[torch.Generator] = None,
                  dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> torch.Tensor:
    """Standard Gumbel noise -log(-log U), with U kept away from 0 and 1 (no log(0))."""
    u = torch.rand(shape, generator=generator, dtype=dtype, device=device)
    return -torch.log(-torch.log(u.clamp(_EPS, 1 - _EPS)))


def gumbel_softmax_probs(logits: torch.Tensor, tau: float, kappa: float,
                         generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """(..., C) pattern probabilities of one Gumbel-Softmax sample."""
    noise = sample_gumbel(logits.shape, generator, torch.float32, logits.device)
    return torch.softmax((kappa * logits.float() + noise) / tau, dim=-1)


def soft_mask(probs: torch.Tensor, patterns: torch.Tensor) -> torch.Tensor:
    """(out, G, C) probabilities x (C, M) patterns -> (out, G*M) soft mask."""
    mask = probs @ patterns.to(probs.dtype)  # (out, G, M)
    return mask.reshape(probs.shape[0], -1)  # (out, in)


def hard_mask(logits: torch.Tensor, patterns: torch.Tensor) -> torch.Tensor:
    """(out, G, C) logits -> (out, G*M) bool mask of the argmax pattern."""
    chosen = patterns.bool()[logits.argmax(dim=-1)]  # (out, G, M)
    return chosen.reshape(logits.shape[0], -1)


def pattern_overlap(prior: torch.Tensor, patterns: torch.Tensor, m: int) -> torch.Tensor:
    """(out, in) bool prior -> (out, G, C): how many kept positions each pattern shares with it."""
    groups = prior.reshape(prior.shape[0], -1, m).to(patterns.dtype)  # (out, G, M)
    return groups @ patterns.T  # (out, G, C)
