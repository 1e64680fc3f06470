"""SparseSwaps: exact 1-swap refinement of an N:M mask for fixed weights.

Derivation. Rows of W are independent (each row keeps the same number of weights under N:M). For one
row w with pruned set P, let e = w restricted to P (zero elsewhere); the row's output error over the
calibration tokens is L = ||X e||^2 = e^T G e, with G = X^T X. Let c = G e.
Swapping a pruned p (it becomes kept: e_p goes from w_p to 0) with a kept u (it becomes pruned: e_u
goes from 0 to w_u) changes e by d = -w_p 1_p + w_u 1_u, so

    L' - L = 2 c^T d + d^T G d
           = 2 (w_u c_u - w_p c_p) + w_p^2 G_pp + w_u^2 G_uu - 2 w_p w_u G_pu.

After the swap c changes by G d = w_u G[:, u] - w_p G[:, p], an O(in) update. Under N:M, p and u
lie in the same group of M, so each row has (in / M) * N * (M - N) admissible swaps. Each iteration
takes the best swap of every row that still improves; the loss of a row never increases.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from compressor.errors import SparsityPatternError
from compressor.sparsity import NM, SparsityTarget, assert_nm, check_divisible


@dataclass
class SwapResult:
    mask: torch.Tensor  # bool (out, in), True = kept
    weight: torch.Tensor  # (out, in): W * mask, or the re-fitted weights
    swaps_per_row: torch.Tensor  # (out,) int64
    loss_before: torch.Tensor  # (out,) float64, e^T G e of the warm start
    loss_after: torch.Tensor  # (out,) float64


def row_losses(weight: torch.Tensor, gram: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """e^T G e per row, e = w on the pruned entries."""
    e = weight.to(torch.float64) * (~mask)
    return ((e @ gram.to(torch.float64)) * e).sum(dim=1)


def _grouped(t: torch.Tensor, nm: NM) -> torch.Tensor:
    return t.reshape(t.shape[0], -1, nm.m)  # (R, G, M)


def swap_constant(w: torch.Tensor, gram: torch.Tensor, nm: NM) -> torch.Tensor:
    """The part of every swap delta that does not change as swaps are made (it depends on w and G only):
    w_p^2 G_pp + w_u^2 G_uu - 2 w_p w_u G_pu, as (R, G, M, M) indexed [r, g, p, u]."""
    cols = w.shape[1]
    idx = torch.arange(cols).reshape(cols // nm.m, nm.m)
    g_blk = gram[idx.unsqueeze(-1), idx.unsqueeze(-2)]  # (G, M, M) within-group blocks
    wg = _grouped(w, nm)
    sq = wg * wg * torch.diagonal(g_blk, dim1=-2, dim2=-1)  # (R, G, M): w_i^2 G_ii
    return sq.unsqueeze(-1) + sq.unsqueeze(-2) - 2 * wg.unsqueeze(-1) * wg.unsqueeze(-2) * g_blk


def swap_deltas(w: torch.Tensor, c: torch.Tensor, mask: torch.Tensor, nm: NM, constant: torch.Tensor) -> torch.Tensor:
    """Loss change of every within-group swap: (R, G, M, M), entry [r, g, a, b] for pruned a becoming
    kept and kept b becoming pruned; +inf where (a, b) is not such a pair. ``constant`` comes from
    :func:`swap_constant` for the same rows."""
    t = 2 * _grouped(w, nm) * _grouped(c, nm)  # (R, G, M): 2 w_i c_i
    delta = constant - t.unsqueeze(-1) + t.unsqueeze(-2)
    kept = _grouped(mask, nm)
    valid = (~kept).unsqueeze(-1) & kept.unsqueeze(-2)  # a pruned, b kept
    return delta.masked_fill(~valid, float("inf"))


def sparseswaps(
    weight: torch.Tensor,
    gram: torch.Tensor,
    mask: torch.Tensor,
    sparsity: SparsityTarget,
    *,
    max_iters: int = 1000,
    refit: bool = False,
    tol: float = 1e-12,
    what: str = "layer",
) -> SwapResult:
    """Refine ``mask`` by best-improvement swaps, at most ``max_iters`` per row."""
    if not isinstance(sparsity, NM):
        raise SparsityPatternError(f"{what}: SparseSwaps refines N:M masks; unstructured sparsity is not supported")
    nm = sparsity
    rows, cols = weight.shape
    check_divisible(cols, nm.m, what)
    assert_nm(mask, nm, f"{what} warm-start mask")
    g = gram.to(torch.float64)
    w = weight.detach().to(torch.float64)
    mask = mask.clone().bool()
    if int(mask.reshape(rows, -1, nm.m).sum(-1).min()) < nm.n:
        raise SparsityPatternError(f"{what}: the warm-start mask keeps fewer than N={nm.n} weights in some groups")
    c = (w * (~mask)) @ g  # (R, in): G e per row (G symmetric)
    loss_before = ((c * (w * (~mask))).sum(1)).clone()
    swaps = torch.zeros(rows, dtype=torch.int64)
    active = torch.arange(rows)
    constant = swap_constant(w, g, nm)
    scale = torch.diagonal(g).mean().clamp_min(1e-300) * (w * w).sum(1).clamp_min(1e-300)  # per-row loss scale
    for _ in range(max_iters):
        if active.numel() == 0:
            break
        delta = swap_deltas(w[active], c[active], mask[active], nm, constant[active])  # (A, G, M, M)
        best, flat = delta.reshape(active.numel(), -1).min(dim=1)
        improving = best < -tol * scale[active]
        if not improving.any():
            break
        rows_i, flat = active[improving], flat[improving]
        group, rest = flat // (nm.m * nm.m), flat % (nm.m * nm.m)
        p = group * nm.m + rest // nm.m  # pruned -> kept
        u = group * nm.m + rest % nm.m  # kept -> pruned
        mask[rows_i, p] = True
        mask[rows_i, u] = False
        c[rows_i] += w[rows_i, u].unsqueeze(1) * g[u] - w[rows_i, p].unsqueeze(1) * g[p]  # c += G d
        swaps[rows_i] += 1
        active = rows_i
    loss_after = row_losses(w, g, mask)
    new_weight = refit_kept(w, g, mask) if refit else w * mask
    return SwapResult(mask, new_weight.to(weight.dtype), swaps, loss_before, loss_after)


def refit_kept(w: torch.Tensor, g: torch.Tensor, mask: torch.Tensor, damp: float = 1e-6, chunk: int = 64) -> torch.Tensor:
    """Least squares on each row's kept support K: minimise ||(w - w') X^T|| with w' zero off K,
    i.e. solve G_KK w'_K = (G w)_K (lightly damped for singular G)."""
    rows, cols = w.shape
    out = torch.zeros_like(w)
    rhs_all = w @ g  # (R, in)
    lam = damp * torch.diagonal(g).mean()
    for r0 in range(0, rows, chunk):
        m = mask[r0 : r0 + chunk]
        k = int(m[0].sum())
        if not bool((m.sum(1) == k).all()):
            raise SparsityPatternError("refit needs the same number of kept weights in every row")
        idx = m.nonzero()[:, 1].reshape(m.shape[0], k)  # (C, k) kept columns per row
        g_kk = g[idx.unsqueeze(-1), idx.unsqueeze(-2)] + lam * torch.eye(k, dtype=g.dtype)  # (C, k, k)
        rhs = torch.gather(rhs_all[r0 : r0 + chunk], 1, idx)  # (C, k)
        sol = torch.linalg.solve(g_kk, rhs)
        out[r0 : r0 + chunk].scatter_(1, idx, sol)
    return out
