"""SparseGPT (Frantar & Alistarh, 2023): prune columns left to right and let the not-yet-pruned
columns absorb each pruned weight's error through the optimal-brain-surgeon (OBS) update.

With H = G + lambda I (G = sum of x x^T over calibration tokens) and U the upper Cholesky factor of
H^{-1}, pruning weight w_j of a row and updating the later columns by -(w_j / U_jj) U_{j, j:} is the
exact OBS step for the remaining columns. Columns are processed in lazy blocks: updates inside a
block are immediate, the block's accumulated error reaches later columns in one matrix product.
N:M masks are chosen at the first column of each group from w^2 / U_jj^2 of the current weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from compressor.errors import NonFiniteError, SparsityPatternError
from compressor.sparsity import NM, SparsityTarget, check_divisible
from compressor.utils.logging import get_logger

log = get_logger(__name__)


@dataclass
class SparseGPTResult:
    mask: torch.Tensor  # bool (out, in), True = kept
    weight: torch.Tensor  # (out, in) in the input dtype, zero where pruned


def inverse_hessian_factor(gram: torch.Tensor, damp: float, what: str = "layer") -> tuple[torch.Tensor, torch.Tensor]:
    """(U, dead): the upper Cholesky factor of (G + damping)^-1 in float64, and the dead inputs.

    Dead inputs (never non-zero in calibration) get H_ii = 1 so that H stays invertible; their weights
    do not affect the output and are pruned first.
    """
    h = gram.to(torch.float64).clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    mean_diag = torch.diagonal(h).mean()
    for attempt in range(6):
        lam = damp * (10**attempt) * mean_diag
        h_damped = h + lam * torch.eye(h.shape[0], dtype=h.dtype)
        chol, info = torch.linalg.cholesky_ex(h_damped)
        if info == 0:
            hinv = torch.cholesky_inverse(chol)
            u, info = torch.linalg.cholesky_ex(hinv, upper=True)
            if info == 0:
                if attempt:
                    log.warning("%s: Hessian needed dampening %.3g x the mean diagonal", what, damp * 10**attempt)
                return u, dead
    raise NonFiniteError(f"{what}: the Hessian is not positive definite even with strong dampening")


def sparsegpt(
    weight: torch.Tensor,
    gram: torch.Tensor,
    sparsity: SparsityTarget,
    *,
    damp: float = 0.01,
    block_size: int = 128,
    update_weights: bool = True,
    what: str = "layer",
) -> SparseGPTResult:
    rows, cols = weight.shape
    if gram.shape != (cols, cols):
        raise ValueError(f"{what}: Gram matrix {tuple(gram.shape)} does not match weight width {cols}")
    if not torch.isfinite(weight).all():
        raise NonFiniteError(f"{what}: the weight holds NaN/inf")
    if not torch.isfinite(gram).all():
        raise NonFiniteError(f"{what}: the Gram matrix holds NaN/inf (non-finite activations in calibration)")
    nm = sparsity if isinstance(sparsity, NM) else None
    if nm is not None:
        check_divisible(cols, nm.m, what)
        if block_size % nm.m:
            raise SparsityPatternError(f"{what}: block_size {block_size} must be a multiple of M={nm.m}")

    u64, dead = inverse_hessian_factor(gram, damp, what)
    u = u64.to(torch.float32)
    w = weight.detach().to(torch.float32).clone()
    w[:, dead] = 0
    pruned = torch.zeros(rows, cols, dtype=torch.bool)

    for b0 in range(0, cols, block_size):
        b1 = min(b0 + block_size, cols)
        w_blk = w[:, b0:b1].clone()  # (rows, bs): updated in place as columns are pruned
        u_blk = u[b0:b1, b0:b1]
        d_blk = torch.diagonal(u_blk)
        err_blk = torch.zeros_like(w_blk)
        p_blk = torch.zeros_like(w_blk, dtype=torch.bool)
        if nm is None:
            scores = w_blk.pow(2) / d_blk.pow(2)  # (rows, bs)
            k = int(scores.numel() * sparsity.sparsity)
            if k:
                p_blk.view(-1)[scores.view(-1).topk(k, largest=False).indices] = True
        for j in range(b1 - b0):
            if nm is not None and j % nm.m == 0:
                scores = w_blk[:, j : j + nm.m].pow(2) / d_blk[j : j + nm.m].pow(2)  # (rows, m)
                drop = scores.topk(nm.m - nm.n, dim=1, largest=False).indices
                p_blk[:, j : j + nm.m].scatter_(1, drop, True)
            col = w_blk[:, j]
            err = torch.where(p_blk[:, j], col, torch.zeros_like(col)) / d_blk[j]  # (rows,)
            w_blk[:, j:] -= err.unsqueeze(1) * u_blk[j, j:].unsqueeze(0)  # OBS update of the block's rest
            err_blk[:, j] = err
        w_blk[p_blk] = 0
        w[:, b0:b1] = w_blk
        pruned[:, b0:b1] = p_blk
        w[:, b1:] -= err_blk @ u[b0:b1, b1:]  # lazy update of all later columns
    mask = ~pruned
    new_weight = w if update_weights else weight.detach().to(torch.float32) * mask
    return SparseGPTResult(mask, (new_weight * mask).to(weight.dtype))
