"""Gumbel-Softmax over N:M keep-patterns (pure tensor functions, no modules).

Each group of M consecutive input weights owns C = C(M, N) logits, one per keep-pattern (the rows of
``compressor.sparsity.nm_patterns``). Learning draws a soft pattern choice,
``softmax((kappa * logits + g) / tau)`` with Gumbel noise ``g``, and mixes the patterns with it;
evaluation takes the argmax pattern. Shapes: logits (out, G, C) with G = in / M, patterns (C, M).
"""

from __future__ import annotations

from typing import Optional

import torch

# torch.rand draws from [0, 1); some backends have returned 1.0, so U is clamped to the open interval.
# Largest float32 below 1 and smallest normal float32: -log(-log(U)) stays within about [-4.5, 16.7].
_U_MAX = 1.0 - 2.0**-24
_U_MIN = torch.finfo(torch.float32).tiny


def sample_gumbel(
    shape: torch.Size | tuple[int, ...],
    generator: Optional[torch.Generator] = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Standard Gumbel(0, 1) noise ``-log(-log U)`` in float32, finite everywhere (U kept off 0 and 1).

    The same generator state gives the same noise bit for bit, so a resumed run repeats its draws.
    ``device`` defaults to the generator's device (CPU without a generator).
    """
    if device is None:
        device = generator.device if generator is not None else "cpu"
    u = torch.rand(shape, generator=generator, dtype=torch.float32, device=device)
    # in place: fresh weight-sized buffers cost page faults that rival the arithmetic on CPU
    return u.clamp_(_U_MIN, _U_MAX).log_().neg_().log_().neg_()


def gumbel_softmax_probs(
    logits: torch.Tensor,
    tau: float,
    kappa: float,
    generator: Optional[torch.Generator] = None,
    hard: bool = False,
) -> torch.Tensor:
    """(..., C) logits -> (..., C) float32 probabilities of one Gumbel-Softmax sample of ``kappa * logits``.

    ``hard=True`` returns the one-hot of the sampled pattern in the forward pass with the soft sample's
    gradient (straight-through). Logits may be bfloat16; the arithmetic is float32.
    """
    if not tau > 0:
        raise ValueError(f"Gumbel-Softmax temperature tau must be > 0, got {tau}")
    noise = sample_gumbel(logits.shape, generator, logits.device)  # (..., C)
    probs = torch.softmax((kappa * logits.float() + noise) / tau, dim=-1)  # (..., C)
    if not hard:
        return probs
    index = probs.argmax(dim=-1, keepdim=True)  # (..., 1)
    one_hot = torch.zeros_like(probs).scatter_(-1, index, 1.0)  # (..., C)
    return one_hot - probs.detach() + probs


# Pattern weights are floored at exp(-27.6) ~ 1e-12 of the leading pattern's 1. float32 cannot resolve
# them next to the leader anyway, but at low tau they would otherwise be denormal numbers, and W * mask
# full of denormals makes CPU matrix products ~100x slower (measured: 39 s instead of 0.33 s for
# 20 products of a 1536 x 576 weight; a 60-step run went from 13 s to 140 s per step as tau fell).
# A clamp before exp costs a tenth of a compare-and-fill after it.
_LOG_FLOOR = -27.6


def perturbed_probs_(noise: torch.Tensor, logits: torch.Tensor, tau: float, kappa: float) -> torch.Tensor:
    """softmax((kappa * logits + noise) / tau) over the last dimension, computed in ``noise``'s float32
    buffer (overwritten and returned). Pattern weights are floored at ~1e-12 of the leader's."""
    # torch.softmax over a last dimension of size C = 6 is several times slower on CPU than these
    # element-wise passes (measured: 14 ms vs 2.6 ms for a 1536 x 576 layer's logits), and in-place
    # passes avoid a page-faulting allocation each.
    z = noise.add_(logits, alpha=kappa).div_(tau)
    e = z.sub_(z.amax(dim=-1, keepdim=True)).clamp_(min=_LOG_FLOOR).exp_()  # the leader is exactly 1
    return e.div_(e.sum(dim=-1, keepdim=True))


def logit_grad(probs: torch.Tensor, patterns: torch.Tensor, grad_mask: torch.Tensor, scale: float) -> torch.Tensor:
    """d loss / d logits of mask = softmax(z) @ patterns with z = scale * logits + const.

    probs (out, G, C), patterns (C, M), grad_mask = d loss / d mask (out, G * M) -> (out, G, C) float32:
    dp = g @ patterns^T; dz = p * (dp - sum_c p * dp); d logits = dz * scale.
    """
    grad_groups = grad_mask.float().reshape(probs.shape[0], probs.shape[1], -1)  # (out, G, M)
    dprobs = grad_groups @ patterns.T  # (out, G, C)
    mean = (probs * dprobs).sum(dim=-1, keepdim=True)  # (out, G, 1)
    return dprobs.sub_(mean).mul_(probs).mul_(scale)


class _GumbelSoftMask(torch.autograd.Function):
    """mask = softmax((kappa * logits + noise) / tau) @ patterns, saving only the probabilities.

    ``noise`` is consumed (its buffer becomes the probabilities); backward is ``logit_grad``.
    """

    @staticmethod
    def forward(ctx, logits, noise, patterns, tau: float, kappa: float):  # type: ignore[override]
        probs = perturbed_probs_(noise, logits.detach(), tau, kappa)  # (out, G, C)
        ctx.save_for_backward(probs, patterns)
        ctx.scale, ctx.logits_dtype = kappa / tau, logits.dtype
        return soft_mask(probs, patterns)  # (out, in)

    @staticmethod
    def backward(ctx, grad_mask):  # type: ignore[override]
        probs, patterns = ctx.saved_tensors
        return logit_grad(probs, patterns, grad_mask, ctx.scale).to(ctx.logits_dtype), None, None, None, None


def gumbel_soft_mask(
    logits: torch.Tensor,
    tau: float,
    kappa: float,
    patterns: torch.Tensor,
    generator: Optional[torch.Generator] = None,
    noise: bool = True,
) -> torch.Tensor:
    """(out, G, C) logits -> (out, G * M) float32 soft mask of one Gumbel-Softmax sample.

    Equal to ``soft_mask(gumbel_softmax_probs(logits, tau, kappa, generator), patterns)`` (same noise
    for the same generator state) but fused: a third of the memory kept for backward and faster on CPU.
    ``noise=False`` gives the deterministic soft mask of softmax(kappa * logits / tau) and leaves the
    generator untouched.
    """
    if not tau > 0:
        raise ValueError(f"Gumbel-Softmax temperature tau must be > 0, got {tau}")
    gumbel = gumbel_noise(logits, generator, noise)  # (out, G, C)
    return _GumbelSoftMask.apply(logits, gumbel, patterns.to(torch.float32), float(tau), float(kappa))


def gumbel_noise(logits: torch.Tensor, generator: Optional[torch.Generator], noise: bool = True) -> torch.Tensor:
    """A fresh float32 buffer shaped like ``logits``: Gumbel noise, or zeros with ``noise=False``."""
    if noise:
        return sample_gumbel(logits.shape, generator, logits.device)
    return torch.zeros(logits.shape, dtype=torch.float32, device=logits.device)


def soft_mask(probs: torch.Tensor, patterns: torch.Tensor) -> torch.Tensor:
    """(out, G, C) pattern probabilities x (C, M) patterns -> (out, G * M) soft mask.

    Each group's mask is the probability-weighted sum of its patterns, so it sums to N per group.
    """
    groups = probs @ patterns.to(probs.dtype)  # (out, G, M)
    return groups.reshape(probs.shape[0], -1)  # (out, in)


def hard_mask(logits: torch.Tensor, patterns: torch.Tensor) -> torch.Tensor:
    """(out, G, C) logits -> (out, G * M) bool mask of each group's argmax pattern (always valid N:M)."""
    chosen = patterns.bool()[logits.argmax(dim=-1)]  # (out, G, M)
    return chosen.reshape(logits.shape[0], -1)  # (out, in)


def pattern_overlap(mask: torch.Tensor, patterns: torch.Tensor) -> torch.Tensor:
    """(out, in) 0/1 mask -> (out, G, C) float: kept positions each pattern shares with the mask's group."""
    m = patterns.shape[-1]
    groups = mask.reshape(mask.shape[0], -1, m).float()  # (out, G, M)
    return groups @ patterns.float().T  # (out, G, C)


def prior_offsets(mask: torch.Tensor, patterns: torch.Tensor, n: int) -> torch.Tensor:
    """(out, in) prior mask -> (out, G, C) logit offsets ``overlap - N/2``.

    The prior's own pattern gets +N/2, patterns sharing nothing with it -N/2: scaled by a strength
    and added to random logits, this makes the prior the likely argmax without fixing it.
    """
    return pattern_overlap(mask, patterns) - n / 2  # (out, G, C)
