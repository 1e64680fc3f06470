"""Analytic GEMM FLOPs of a training step's linear layers, per method, against dense training.

A linear (out, in) over T tokens costs 2 T in out FLOPs in each of its three GEMMs: the forward
y = x W^T, the input gradient dx = dy W and the weight gradient dW = dy^T x. An N:M sparse kernel skips
(M - N) / M of a GEMM's work only when the sparse operand is N:M along that GEMM's reduction dimension:
W * m_in (N:M along the input) in the forward; W * m_out (N:M along the output) in the input gradient.
A mask along the input does not help the input gradient (it reduces over the output), soft masks
(PDP, MaskLLM) are dense, and the weight gradient is dense in every method here. Attention score
products, norms and the LM head are left out: the figures are the decoder linears' GEMMs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Iterable


@dataclass(frozen=True)
class PassDensities:
    """Fraction of dense GEMM work in each GEMM of a training step (1.0 = dense)."""

    forward: float
    input_grad: float
    weight_grad: float

    @classmethod
    def dense(cls) -> "PassDensities":
        return cls(1.0, 1.0, 1.0)

    def __post_init__(self) -> None:
        for key, value in asdict(self).items():
            if not 0.0 < value <= 1.0:
                raise ValueError(f"GEMM density {key} must be in (0, 1], got {value}")

    @property
    def backward(self) -> float:
        return (self.input_grad + self.weight_grad) / 2  # the backward's two GEMMs cost the same when dense

    @property
    def step(self) -> float:
        return (self.forward + self.input_grad + self.weight_grad) / 3


def linear_gemm_flops(shapes: Iterable[tuple[int, int]], tokens: int, densities: PassDensities) -> dict[str, float]:
    """FLOPs of the forward and backward GEMMs of linears of ``shapes`` (out, in) over ``tokens`` tokens.

    Returns the method's and dense training's FLOPs per pass and their ratios.
    """
    per_gemm = 2.0 * tokens * sum(o * i for o, i in shapes)  # one dense GEMM of every linear
    forward = per_gemm * densities.forward
    backward = per_gemm * (densities.input_grad + densities.weight_grad)
    return {"forward": forward, "backward": backward, "dense_forward": per_gemm, "dense_backward": 2 * per_gemm,
            "forward_vs_dense": densities.forward, "backward_vs_dense": densities.backward,
            "step_vs_dense": densities.step, **{f"{k}_density": v for k, v in asdict(densities).items()}}
