"""Bidirectional N:M weight training (BDWP): N:M work in the forward pass and in the input gradient.

For y = x W^T (W: (out, in)) the three GEMMs of a training step are

    forward      y  = x (W * m_in)^T     m_in:  N:M along the input dimension (groups of M in each row)
    input grad   dx = dy (W * m_out)     m_out: N:M along the output dimension (groups of M in each
                                         column), the reduction dimension of this product
    weight grad  dW = dy^T x             dense: every weight, kept or not, gets its gradient

so the forward and the input gradient both reduce over an N:M operand (sparse tensor cores accelerate
either), and the weight gradient lets pruned weights grow back. Both masks are the magnitude N:M masks
of the current W, regenerated after every optimizer step. The model it ends with is W * m_in.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from compressor.methods.sparse_training.srste import sparse_refined_penalty
from compressor.sparsity import NM, check_divisible, nm_mask_from_scores


def bdwp_masks(weight: torch.Tensor, nm: NM) -> tuple[torch.Tensor, torch.Tensor]:
    """(m_in, m_out), each (out, in) bool: the N largest |w| of every M along the input / output dimension."""
    magnitude = weight.detach().abs()
    m_in = nm_mask_from_scores(magnitude, nm, "weight magnitudes")
    m_out = nm_mask_from_scores(magnitude.T, nm, "weight magnitudes (transposed)").T  # (out, in)
    return m_in, m_out


class _BDWPLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, m_in, m_out):  # type: ignore[override]
        ctx.save_for_backward(x, weight, m_out)
        ctx.has_bias = bias is not None
        return F.linear(x, weight * m_in.to(weight.dtype), bias)  # (..., out)

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        x, weight, m_out = ctx.saved_tensors
        # Under autocast the forward product ran in its dtype (grad_out's), but backward runs outside the
        # autocast region: the two products take that dtype too, as autocast's own linear backward does;
        # autograd casts each gradient to its input's dtype.
        dtype = grad_out.dtype
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_out @ (weight * m_out.to(weight.dtype)).to(dtype)  # (..., out) @ (out, in) -> (..., in)
        flat_out = grad_out.reshape(-1, grad_out.shape[-1])  # (tokens, out)
        if ctx.needs_input_grad[1]:
            grad_w = flat_out.T @ x.reshape(-1, x.shape[-1]).to(dtype)  # (out, tokens) @ (tokens, in): dense
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = flat_out.sum(dim=0)
        return grad_x, grad_w, grad_b, None, None


def bdwp_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], m_in: torch.Tensor,
                m_out: torch.Tensor) -> torch.Tensor:
    """y = x (W * m_in)^T + b whose backward is dx = dy (W * m_out), dW = dy^T x (dense), db = sum dy."""
    return _BDWPLinear.apply(x, weight, bias, m_in, m_out)


class BDWPLinear(nn.Module):
    """A reversible swap of an ``nn.Linear`` (``from_linear`` / ``to_linear``) that trains with BDWP.

    It holds the linear's own ``weight`` and ``bias`` parameters (the same objects), so parameter names,
    optimizer state and checkpoints are those of the plain model. Eval mode computes with W * m_in.
    """

    def __init__(self, weight: nn.Parameter, bias: Optional[nn.Parameter], nm: NM, name: str = "layer") -> None:
        super().__init__()
        out_features, in_features = weight.shape
        check_divisible(in_features, nm.m, f"{name} (BDWP {nm}, input dimension)")
        check_divisible(out_features, nm.m, f"{name} (BDWP {nm}, output dimension: the input gradient's mask)")
        self.weight, self.bias = weight, bias
        self.in_features, self.out_features = in_features, out_features
        self.nm, self.name = nm, name
        self.track_penalty = False  # the SR-STE sparse-refined term on m_in (the trainer turns it on)
        self.penalty: Optional[torch.Tensor] = None
        self._masks: Optional[tuple[torch.Tensor, torch.Tensor]] = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, nm: NM, name: str = "layer") -> "BDWPLinear":
        return cls(linear.weight, linear.bias, nm, name)

    @torch.no_grad()
    def to_linear(self, bake: bool = True) -> nn.Linear:
        """A plain nn.Linear again, with W * m_in (``bake``) or the dense W, sharing the parameters."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        if bake:
            self.weight.mul_(self.hard_mask().to(self.weight.dtype))
        linear.weight, linear.bias = self.weight, self.bias
        return linear

    def masks(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._masks is None:
            self._masks = bdwp_masks(self.weight, self.nm)
        return self._masks

    def weights_changed(self) -> None:
        self._masks = None

    def hard_mask(self) -> torch.Tensor:
        return bdwp_masks(self.weight, self.nm)[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m_in, m_out = self.masks()
        if not (self.training and torch.is_grad_enabled()):
            return F.linear(x, self.weight * m_in.to(self.weight.dtype), self.bias)
        if self.track_penalty:
            self.penalty = sparse_refined_penalty(self.weight, m_in)
        return bdwp_linear(x, self.weight, self.bias, m_in, m_out)

    def train(self, mode: bool = True) -> "BDWPLinear":
        if not mode:
            self.penalty = None
        return super().train(mode)

    def extra_repr(self) -> str:
        return f"{self.name}, in_features={self.in_features}, out_features={self.out_features}, {self.nm}"
