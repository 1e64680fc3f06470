"""SparseGPT (Frantar & Alistarh, 2023): prune columns left to right and let the columns not yet
visited absorb each pruned weight's error through the optimal-brain-surgeon (OBS) update.

Let H = G + lambda I (G = sum of x x^T over calibration tokens; any positive scale of G gives the same
result because lambda = damp * mean(diag H)) and U the upper Cholesky factor of H^{-1}. When columns
0..j-1 are done, [U_jj^2, U_{j, j:} U_jj] are the diagonal and row j of the inverse of H restricted to
the remaining columns j.., so the textbook OBS step for pruning w_j (weights of column j, all rows) is

    err = w_j / U_jj (0 for kept rows),    W[:, j:] -= err U_{j, j:}

and its score is w_j^2 / U_jj^2. N:M masks are chosen at the first column of each group of M from the
scores of the group's current (already updated) weights; unstructured masks prune the lowest
``sparsity`` fraction of the scores of each column block, over all rows at once.

Speed (the column loop is in float32): W is held transposed, so a column is a contiguous row, and the
updates are lazy at two levels. Within a sub-block (an N:M group, or 16 columns for unstructured) each
column's update is immediate; each sub-block then updates the rest of its ``block_size`` block with one
rank-M product, and each block updates all later columns with one matrix product. This is the same
arithmetic as the column-at-a-time recurrence, in a different summation order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from compressor.errors import DataError, NonFiniteError
from compressor.sparsity import NM, SparsityTarget, check_divisible
from compressor.utils.logging import get_logger

log = get_logger(__name__)

_SUB_BLOCK = 16  # unstructured: columns whose updates are immediate (the mask of the block is fixed)


@dataclass
class HessianFactor:
    """What every layer reading the same inputs shares: computed once per statistics group (and once for
    all row chunks of a layer), since at width 1536 it costs more than the column sweep itself."""

    upper: torch.Tensor  # (in, in) float32, U^T U = (G + damp * mean(diag G) I)^{-1}
    dead: torch.Tensor  # (in,) bool, inputs never seen in calibration
    damp: float


@dataclass
class SparseGPTResult:
    mask: torch.Tensor  # bool (out, in), True = kept
    weight: torch.Tensor  # (out, in) in the input dtype, zero where pruned


def check_layer_inputs(weight: torch.Tensor, gram: torch.Tensor, what: str, finite_gram: bool = True) -> None:
    """Shapes agree and nothing is NaN/inf; shared by the Gram-based methods. ``finite_gram=False``
    skips scanning the Gram matrix (a Hessian factor made from it has already checked it)."""
    if weight.dim() != 2:
        raise ValueError(f"{what}: expected a 2-D (out, in) weight, got shape {tuple(weight.shape)}")
    cols = weight.shape[1]
    if gram.shape != (cols, cols):
        raise ValueError(f"{what}: Gram matrix {tuple(gram.shape)} does not match the weight's input width {cols}")
    if not torch.isfinite(weight).all():
        bad = int((~torch.isfinite(weight)).sum())
        raise NonFiniteError(f"{what}: the weight holds {bad} NaN/inf entries; the model itself is broken")
    if finite_gram:
        check_gram_finite(gram, what)


def check_gram_finite(gram: torch.Tensor, what: str) -> None:
    if not torch.isfinite(gram).all():
        bad = int((~torch.isfinite(gram)).sum())
        raise NonFiniteError(
            f"{what}: the Gram matrix holds {bad} NaN/inf entries (non-finite or overflowing activations during "
            "calibration); recompute the statistics in float32/float64"
        )


# The factor works in place on one buffer, by halves: at width 1536 fresh buffers (page faults) and
# torch's zeroing of the upper triangle after a whole-matrix Cholesky cost as much as LAPACK's arithmetic.


def cholesky_(a: torch.Tensor, leaf: int = 256) -> bool:
    """Overwrite symmetric ``a`` with its lower Cholesky factor L (L L^T = a), zeros above the diagonal;
    False if ``a`` is not positive definite (then ``a`` holds garbage). By halves: L11 = chol(A11),
    L21 = A21 L11^-T, L22 = chol(A22 - L21 L21^T)."""
    n = a.shape[0]
    if n <= leaf:
        chol, info = torch.linalg.cholesky_ex(a)
        a.copy_(chol)
        return int(info) == 0
    k = n // 2
    if not cholesky_(a[:k, :k], leaf):
        return False
    a[k:, :k] = torch.linalg.solve_triangular(a[:k, :k].mT, a[k:, :k], upper=True, left=False)
    a[k:, k:].addmm_(a[k:, :k], a[k:, :k].mT, alpha=-1)
    a[:k, k:].zero_()
    return cholesky_(a[k:, k:], leaf)


def lower_triangular_inverse_(lower: torch.Tensor, leaf: int = 128) -> torch.Tensor:
    """Overwrite lower triangular L with L^{-1} and return it, by halves:
    [[A, 0], [C, D]]^{-1} = [[A^-1, 0], [-D^-1 C A^-1, D^-1]], the corner by two triangular solves
    before A and D are inverted in their places."""
    n = lower.shape[0]
    if n <= leaf:
        eye = torch.eye(n, dtype=lower.dtype, device=lower.device)
        return lower.copy_(torch.linalg.solve_triangular(lower, eye, upper=False))
    k = n // 2
    c_a_inv = torch.linalg.solve_triangular(lower[:k, :k], lower[k:, :k], upper=False, left=False)  # X A = C
    lower[k:, :k] = torch.linalg.solve_triangular(lower[k:, k:], c_a_inv, upper=False).neg_()
    lower_triangular_inverse_(lower[:k, :k], leaf)
    lower_triangular_inverse_(lower[k:, k:], leaf)
    return lower


def inverse_hessian_factor(
    gram: torch.Tensor, damp: float, what: str = "layer", dtype: torch.dtype = torch.float64, max_tries: int = 6
) -> tuple[torch.Tensor, torch.Tensor]:
    """(U, dead): U (in, in) upper triangular in ``dtype`` (computed in float64) with
    U^T U = (G + lambda I)^{-1}; dead (in,) bool.

    Dead inputs (never non-zero in calibration) get H_ii = 1 so that H stays invertible; the caller
    zeroes their weights, which do not affect the output. U is computed without forming H^{-1}: with J
    the order-reversing permutation and J H J = L L^T, H = (J L J)(J L J)^T with J L J upper triangular,
    so H^{-1} = U^T U for U = J L^{-1} J (one Cholesky and one triangular inverse instead of three
    cubic steps, and better conditioned).
    """
    check_gram_finite(gram, what)
    dead = torch.diagonal(gram) == 0
    for attempt in range(max_tries):
        frac = damp if attempt == 0 else max(damp, 1e-4) * 10**attempt
        work = gram.detach().to(torch.float64).flip(0, 1)  # J H J, a new tensor: factored in place
        diag = torch.diagonal(work)
        diag[diag == 0] = 1.0
        diag += frac * diag.mean()  # the damping
        if cholesky_(work):
            if attempt:
                log.warning("%s: Hessian not positive definite with damp=%g; used damp=%g", what, damp, frac)
            return lower_triangular_inverse_(work).to(dtype).flip(0, 1), dead  # cast first: flip the smaller copy
    raise DataError(
        f"{what}: the Gram matrix is not positive semi-definite (Cholesky fails even with damping "
        f"{frac:g} x its mean diagonal); it is not a sum of x x^T, recompute the calibration statistics"
    )


def hessian_factor(gram: torch.Tensor, damp: float, what: str = "layer") -> HessianFactor:
    upper, dead = inverse_hessian_factor(gram, damp, what, dtype=torch.float32)
    return HessianFactor(upper, dead, damp)


def _group_prune(w: torch.Tensor, inv_d2: torch.Tensor, nm: NM, out: torch.Tensor) -> None:
    """Mark in ``out`` (M, rows) bool, all False, the M - N lowest w^2 / d^2 of each row's group (w: the
    group's columns, transposed; inv_d2: their 1 / d^2). Few, fused operations: this runs once per
    group, and per-operation overhead dominates narrow layers."""
    scores = w.square().mul_(inv_d2.unsqueeze(1))  # (M, rows)
    out.scatter_(0, scores.topk(nm.m - nm.n, dim=0, largest=False).indices, True)


def _block_prune(w: torch.Tensor, d: torch.Tensor, sparsity: float) -> torch.Tensor:
    """(cols, rows) bool: the lowest ``sparsity`` fraction of the block's scores, over all rows."""
    scores = w.pow(2) / d.pow(2).unsqueeze(1)
    pruned = torch.zeros_like(w, dtype=torch.bool)
    k = int(scores.numel() * sparsity)
    if k:
        pruned.view(-1)[scores.reshape(-1).topk(k, largest=False).indices] = True
    return pruned


def _obs_columns(w: torch.Tensor, pruned: torch.Tensor, u: torch.Tensor, inv_d: torch.Tensor, err: torch.Tensor) -> None:
    """OBS over a few columns with a fixed mask, one column at a time.

    w (s, rows) transposed weights, updated in place; pruned (s, rows); u (s, s) the factor's diagonal
    block, inv_d (s,) its 1 / U_jj. Writes into err (s, rows) the scaled errors that later columns still
    have to absorb (err^T U): w_j / U_jj where pruned, else 0.
    """
    torch.mul(pruned, inv_d.unsqueeze(1), out=err)
    for j in range(w.shape[0]):
        err[j].mul_(w[j])
        if j + 1 < w.shape[0]:
            w[j + 1 :].addr_(u[j, j + 1 :], err[j], alpha=-1)


def sparsegpt(
    weight: torch.Tensor,
    gram: torch.Tensor,
    sparsity: SparsityTarget,
    *,
    damp: float = 0.01,
    block_size: int = 128,
    update_weights: bool = True,
    what: str = "layer",
    factor: HessianFactor | None = None,
) -> SparseGPTResult:
    """Prune ``weight`` (out, in) given the Gram matrix (in, in) of its inputs.

    ``update_weights=False`` returns the same mask with the original weights (W * mask), e.g. as a
    prior for mask learning. For N:M, ``block_size`` is rounded down to a multiple of M (at least M);
    it changes the speed only, not the result. ``factor``: ``hessian_factor(gram, damp)`` computed
    beforehand (the result is the same). Rows are independent for N:M: pruning a slice of rows gives
    that slice of the whole layer's result.
    """
    check_layer_inputs(weight, gram, what, finite_gram=False)  # hessian_factor checks it
    if block_size < 1:
        raise ValueError(f"{what}: block_size must be positive, got {block_size}")
    rows, cols = weight.shape
    nm = sparsity if isinstance(sparsity, NM) else None
    if nm is not None:
        check_divisible(cols, nm.m, what)
        block, step = max(nm.m, block_size - block_size % nm.m), nm.m
    else:
        block, step = block_size, min(_SUB_BLOCK, block_size)

    if factor is None:
        factor = hessian_factor(gram, damp, what)
    elif factor.damp != damp or factor.upper.shape != (cols, cols):
        raise ValueError(f"{what}: the given Hessian factor was made with damp={factor.damp} for width "
                         f"{factor.upper.shape[0]}, not damp={damp} for width {cols}")
    u, dead = factor.upper, factor.dead
    d = torch.diagonal(u)
    inv_d = d.reciprocal()
    inv_d2 = inv_d.square()
    # (in, out): column j of W is row j here. copy=True: for a single row, .t().contiguous() would not
    # copy, and the updates below would write into the caller's weight.
    wt = weight.detach().to(torch.float32, copy=True).t().contiguous()
    wt[dead] = 0
    pruned = torch.zeros(cols, rows, dtype=torch.bool, device=wt.device)
    err = torch.empty(min(block, cols), rows, dtype=wt.dtype, device=wt.device)

    for b0 in range(0, cols, block):
        b1 = min(b0 + block, cols)
        if nm is None:
            pruned[b0:b1] = _block_prune(wt[b0:b1], d[b0:b1], sparsity.sparsity)
        for s0 in range(b0, b1, step):
            s1 = min(s0 + step, b1)
            if nm is not None:
                _group_prune(wt[s0:s1], inv_d2[s0:s1], nm, out=pruned[s0:s1])
            e = err[s0 - b0 : s1 - b0]  # (s, rows)
            _obs_columns(wt[s0:s1], pruned[s0:s1], u[s0:s1, s0:s1], inv_d[s0:s1], e)
            if s1 < b1:  # the rest of this block absorbs the sub-block's error now
                wt[s1:b1].addmm_(u[s0:s1, s1:b1].t(), e, alpha=-1)
        if b1 < cols:  # later blocks absorb the whole block's error in one product
            wt[b1:].addmm_(u[b0:b1, b1:].t(), err[: b1 - b0], alpha=-1)

    mask = ~pruned.t()
    if not update_weights:
        return SparseGPTResult(mask.contiguous(), (weight.detach() * mask).to(weight.dtype))
    wt.masked_fill_(pruned, 0)
    if not torch.isfinite(wt).all():
        raise NonFiniteError(f"{what}: the SparseGPT update produced NaN/inf; raise `damp` (now {damp})")
    return SparseGPTResult(mask.contiguous(), wt.t().contiguous().to(weight.dtype))
