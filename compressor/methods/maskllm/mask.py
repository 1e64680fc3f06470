"""The learnable N:M mask as a parametrization of a module's ``weight`` (out, in).

Registered with ``torch.nn.utils.parametrize.register_parametrization(module, "weight", mask)``, it
wraps nn.Linear and megatron-core's Column/RowParallelLinear alike: their forward reads
``self.weight`` and receives W * mask, so no layer math changes. (Tensor-parallel shards are masked
locally, so a RowParallelLinear shard's input width must be divisible by M.)

The module's own train/eval mode picks the mask: training -> a Gumbel-Softmax sample (soft),
eval -> the argmax pattern (hard). ``model.train()``/``model.eval()`` reach it like any submodule;
``register_parametrization`` copies the host module's mode (``attach_masks`` then sets eval).
``noise = False`` (``set_noise``) makes training masks deterministic, softmax(kappa * logits / tau): the
same in every process layout, which is what exact cross-layout tests compare.

Not supported: activation checkpointing around masked layers. A recomputed forward draws new noise
from ``generator``, so its mask would differ from the one the loss saw.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from compressor.errors import NonFiniteError, SparsityPatternError
from compressor.methods.maskllm.config import check_pattern_count
from compressor.methods.maskllm.gumbel import (
    gumbel_noise, gumbel_soft_mask, hard_mask, logit_grad, perturbed_probs_, prior_offsets, soft_mask,
)
from compressor.sparsity import NM, assert_nm, check_divisible, nm_patterns
from compressor.utils.logging import get_logger

log = get_logger(__name__)

class NMMaskParametrization(nn.Module):
    """Logits (out, in / M, C(M, N)) over each group's keep-patterns; forward(W) = W * mask."""

    def __init__(
        self,
        out_features: int,
        in_features: int,
        nm: NM,
        *,
        init_std: float = 0.01,
        dtype: torch.dtype = torch.float32,
        seed: int = 0,
        name: str = "layer",
        device: torch.device | str | None = None,
        noise: bool = True,
    ) -> None:
        super().__init__()
        check_divisible(in_features, nm.m, f"{name} (learnable {nm} mask)")
        check_pattern_count(nm)
        if not init_std > 0:
            raise ValueError(f"{name}: init_std must be > 0, got {init_std}")
        self.nm, self.name, self.seed = nm, name, seed
        self.shape = (out_features, in_features)
        patterns = nm_patterns(nm, device).float()  # (C, M)
        self.register_buffer("patterns", patterns, persistent=False)
        shape = (out_features, in_features // nm.m, patterns.shape[0])  # (out, G, C)
        if patterns.device.type == "meta":  # shapes only (``compressor.parallel.meta_proof``): nothing to draw
            self.generator = torch.Generator().manual_seed(seed)  # torch has no meta generators
            init = torch.empty(shape, device=patterns.device)
        else:
            self.generator = torch.Generator(device=patterns.device).manual_seed(seed)
            init = torch.randn(shape, generator=self.generator, device=patterns.device)
        self.logits = nn.Parameter((init * init_std).to(dtype))
        self.tau, self.kappa = 4.0, 100.0
        # False: soft masks without Gumbel noise (deterministic; the generator is not advanced).
        self.noise = bool(noise)
        # W * mask of the latest training forward, kept for the sparse-weight regulariser.
        self.last_masked: Optional[torch.Tensor] = None
        # A sample held for all micro-batches of one optimizer step (see ``hold_sample``).
        self.held: Optional[torch.Tensor] = None
        self._sample: Optional[tuple[torch.Tensor, torch.Tensor, float]] = None  # (W, probs, kappa / tau)
        self.train(False)  # hard masks until the trainer asks for learning

    # -- forward --------------------------------------------------------------------------------
    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        self._check_shape(weight, self.shape, "the weight to mask")
        if not self.training:
            return weight * hard_mask(self.logits, self.patterns).to(weight.dtype)
        if self.held is not None:
            return self.held
        soft = gumbel_soft_mask(self.logits, self.tau, self.kappa, self.patterns, self.generator, noise=self.noise)
        # Under autocast the product stays float32 (bf16 weights are promoted) and the linear casts it for
        # its matrix product, so the mask's gradient is formed in float32; without, it follows the weight.
        soft = soft if torch.is_autocast_enabled(weight.device.type) else soft.to(weight.dtype)
        masked = weight * soft  # (out, in)
        self.last_masked = masked
        return masked

    @torch.no_grad()
    def hold_sample(self, weight: torch.Tensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """Draw one soft sample W * mask and serve it to every forward until it is released.

        Forwards see it as a leaf that requires grad, so micro-batch backward passes only accumulate
        G = d loss / d (W * mask) on it; ``sample_gradients`` then turns G into the logits' gradient
        once. No autograd graph is kept: the probabilities are all the backward needs. ``dtype``: of
        the sample, and so of G's accumulation (default the weight's; float32 under autocast, whose
        products cast it, keeps G exact to float32 when the frozen weights are held in bf16).
        """
        if not self.training:
            raise RuntimeError(f"{self.name}: hold_sample needs a training (soft) mask; call mask_train(masks, True)")
        self._check_shape(weight, self.shape, "the weight to mask")
        noise = gumbel_noise(self.logits, self.generator, self.noise)  # (out, G, C)
        probs = perturbed_probs_(noise, self.logits, self.tau, self.kappa)  # (out, G, C)
        masked = soft_mask(probs, self.patterns).to(dtype or weight.dtype).mul_(weight)  # (out, in)
        self._sample = (weight, probs, self.kappa / self.tau)
        self.held = masked.requires_grad_(True)
        return self.held

    @torch.no_grad()
    def sample_gradients(self, lam: float = 0.0) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Release the held sample; returns [(parameter, gradient)] of (loss - lam * ||W * mask||^2).

        The loss gradient is the G its forwards accumulated on the sample. d/d mask = W * (G - 2 lam W * mask)
        goes through the softmax to the logits (``logit_grad``); with trainable weights, W gets
        mask * (G - 2 lam W * mask). Empty if no forward used the sample and lam is 0.
        """
        if self.held is None:
            raise RuntimeError(f"{self.name}: no held sample to release; call hold_sample first")
        held, (weight, probs, scale) = self.held, self._sample
        self.held, self._sample = None, None
        if held.grad is None and lam == 0:
            return []
        g = held.grad.float() if held.grad is not None else torch.zeros(held.shape, device=held.device)
        if lam > 0:
            g.sub_(held.detach().float(), alpha=2 * lam)  # (out, in) d/d(W * mask) of the whole objective
        grads = []
        if weight.requires_grad:
            grads.append((weight, soft_mask(probs, self.patterns).mul_(g)))
        grads.append((self.logits, logit_grad(probs, self.patterns, g.mul_(weight), scale)))
        return grads

    def release_sample(self) -> None:
        """Stop serving the held sample without using it (a step that failed in between)."""
        self.held, self._sample = None, None

    def train(self, mode: bool = True) -> "NMMaskParametrization":
        if not mode:
            self.last_masked = None  # do not hold a weight-sized tensor while evaluating
            self.release_sample()
        return super().train(mode)

    def set_noise(self, enabled: bool) -> None:
        """Gumbel noise in training samples (the default) or deterministic soft masks (tests, diagnostics)."""
        self.noise = bool(enabled)

    def set_schedule(self, tau: float, kappa: float) -> None:
        """Temperature and logit scale of the next samples (the trainer sets them every step)."""
        if not (tau > 0 and kappa > 0) or tau == float("inf") or kappa == float("inf"):
            raise ValueError(f"{self.name}: tau and kappa must be finite and > 0, got tau={tau} kappa={kappa}")
        self.tau, self.kappa = float(tau), float(kappa)

    def _apply(self, fn, recurse: bool = True):  # type: ignore[override]
        # model.to(device) moves the logits; the noise generator must live on the same device.
        super()._apply(fn, recurse)
        device = self.logits.device
        if device.type != "meta" and self.generator.device != device:
            log.debug("%s: mask noise generator re-seeded on %s", self.name, device)
            self.generator = torch.Generator(device=device).manual_seed(self.seed)
        return self

    # -- initialisation -------------------------------------------------------------------------
    def _check_shape(self, t: torch.Tensor, expected: tuple[int, ...], what: str) -> None:
        if tuple(t.shape) != tuple(expected):
            raise SparsityPatternError(
                f"{self.name}: {what} has shape {tuple(t.shape)}, expected {tuple(expected)} for this layer"
            )

    @torch.no_grad()
    def init_from_prior(self, prior: torch.Tensor, strength: float) -> None:
        """Add ``strength * std(logits) * (overlap with the prior's group pattern - N/2)`` to the logits.

        ``prior`` is an (out, in) mask keeping at most N per group (e.g. SparseGPT's); strength 0 changes
        nothing, 3 makes the prior the argmax of nearly every group while leaving room to move.
        """
        if not strength >= 0:
            raise ValueError(f"{self.name}: prior strength must be >= 0, got {strength}")
        prior = self.check_prior(prior)
        if strength == 0:
            return
        offsets = prior_offsets(prior, self.patterns, self.nm.n)  # (out, G, C)
        logits = self.logits.float()
        self.logits.copy_((logits + strength * logits.std() * offsets).to(self.logits.dtype))

    def check_prior(self, prior: torch.Tensor) -> torch.Tensor:
        """``prior`` as a bool mask on the logits' device, checked: this layer's shape, at most N per group."""
        self._check_shape(prior, self.shape, "prior mask")
        prior = prior.to(self.patterns.device) != 0
        assert_nm(prior, self.nm, f"{self.name}: prior mask")
        return prior

    @torch.no_grad()
    def load_logits(self, logits: torch.Tensor, what: str = "logits") -> None:
        """Start from an earlier run's logits (transfer to new data, or a resume)."""
        self._check_shape(logits, tuple(self.logits.shape), what)
        if not torch.isfinite(logits).all():
            raise NonFiniteError(f"{self.name}: {what} hold NaN or inf values; they cannot initialise the mask")
        self.logits.copy_(logits.to(self.logits.dtype))

    # -- inspection -----------------------------------------------------------------------------
    @torch.no_grad()
    def hard_mask(self) -> torch.Tensor:
        """(out, in) bool: each group's argmax pattern."""
        return hard_mask(self.logits, self.patterns)

    @torch.no_grad()
    def argmax_patterns(self) -> torch.Tensor:
        """(out, G) long pattern indices (rows of ``nm_patterns``); compare two of them for the flip rate."""
        return self.logits.argmax(dim=-1)

    @torch.no_grad()
    def max_prob(self) -> float:
        """Mean over groups of the largest probability of softmax(kappa * logits): 1/C uniform, 1 decided."""
        return float(torch.softmax(self.kappa * self.logits.float(), dim=-1).amax(dim=-1).mean())

    def extra_repr(self) -> str:
        noise = "" if self.noise else ", noise off"
        return f"{self.name}, {self.nm}, logits {tuple(self.logits.shape)} {self.logits.dtype}{noise}"
