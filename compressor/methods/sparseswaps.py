"""SparseSwaps: exact 1-swap refinement of a pruning mask for fixed weights.

Derivation. Rows of W are independent: a swap keeps each row's number of kept weights (and, for N:M,
each group's), and the output error tr((W - Wp) G (W - Wp)^T) is a sum over rows. For one row w with
pruned set P and kept set K, let e = w on P and 0 on K, so Wp's row is w - e and the row's error over
the calibration tokens is L = ||X e||^2 = e^T G e, G = X^T X. Let c = G e.

Swapping pruned p (becomes kept, e_p: w_p -> 0) with kept u (becomes pruned, e_u: 0 -> w_u) moves e
by d = w_u 1_u - w_p 1_p, and since G is symmetric

    L' - L = (e + d)^T G (e + d) - e^T G e = 2 d^T c + d^T G d
           = 2 w_u c_u - 2 w_p c_p + w_u^2 G_uu + w_p^2 G_pp - 2 w_p w_u G_pu
           = a_u + b_p - 2 w_p w_u G_pu,

with a_u = w_u (w_u G_uu + 2 c_u) the change from pruning u alone and b_p = w_p (w_p G_pp - 2 c_p)
the change from keeping p alone (c_p includes w_p G_pp since p is pruned). After the swap
c' = G (e + d) = c + w_u G[:, u] - w_p G[:, p]: O(in) per row, so c is never recomputed.

Search. N:M: p and u must lie in the same group of M; every admissible delta of a row (in / M groups
of M x M pairs, inadmissible ones +inf) costs O(in * M) per iteration, and the part of it that does
not involve c is computed once. Each iteration applies the best swap of every row whose best delta
is below -tol * (the row's current loss); rows that stop improving leave the batch for good.
Unstructured (swaps anywhere in a row, each row keeps its count): evaluating all |P| |K| pairs
every iteration is O(in^2) per row, so each iteration first evaluates the exact deltas of the
``candidates`` x ``candidates`` pairs with the lowest b_p and a_u and takes the best; only rows
where no candidate improves get the full scan of all pairs, whose best swap is then taken. A row
stops when even the full scan finds no improving swap, so the result is a 1-swap local optimum.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from compressor.errors import DataError, SparsityPatternError
from compressor.methods.objective import output_energy
from compressor.methods.sparsegpt import check_layer_inputs
from compressor.sparsity import NM, SparsityTarget, assert_nm, check_divisible

_FULL_SCAN_ELEMENTS = 1 << 22  # (rows, in, in) entries per chunk of an unstructured full scan
_REFIT_ELEMENTS = 1 << 22  # (rows, k, k) entries per chunk of the batched least-squares solve
_NOISE = 1e-13  # deltas below this fraction of sum_i w_i^2 G_ii are rounding noise, never taken


@dataclass
class SwapResult:
    mask: torch.Tensor  # bool (out, in), True = kept
    weight: torch.Tensor  # (out, in) in the input dtype: W * mask, or the re-fitted kept weights
    swaps_per_row: torch.Tensor  # (out,) int64
    loss_before: torch.Tensor  # (out,) float64, e^T G e of the warm-start mask
    loss_after: torch.Tensor  # (out,) float64, output error of the returned weight (after refit if any)


def row_losses(weight: torch.Tensor, gram: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(out,) float64: e^T G e per row, e = the weights that ``mask`` prunes."""
    return output_energy(weight.to(torch.float64) * ~mask.bool(), gram)


def swap_constant(w: torch.Tensor, gram: torch.Tensor, nm: NM) -> torch.Tensor:
    """(R, G, M, M) float64, [r, g, a, b] = w_a^2 G_aa + w_b^2 G_bb - 2 w_a w_b G_ab within group g:
    the part of a swap's delta that depends on w and G only (a, b: positions inside the group)."""
    w = w.to(torch.float64)
    cols = w.shape[1]
    idx = torch.arange(cols, device=w.device).reshape(cols // nm.m, nm.m)
    blocks = gram.to(torch.float64)[idx.unsqueeze(-1), idx.unsqueeze(-2)]  # (G, M, M) within-group blocks
    wg = w.reshape(w.shape[0], -1, nm.m)  # (R, G, M)
    sq = wg * wg * torch.diagonal(blocks, dim1=-2, dim2=-1)  # w_i^2 G_ii
    return sq.unsqueeze(-1) + sq.unsqueeze(-2) - 2 * wg.unsqueeze(-1) * wg.unsqueeze(-2) * blocks


def swap_deltas(
    w: torch.Tensor,
    c: torch.Tensor,
    gram: torch.Tensor,
    mask: torch.Tensor,
    sparsity: SparsityTarget,
    constant: torch.Tensor | None = None,
) -> torch.Tensor:
    """Loss change of every admissible swap of each row; +inf where a swap is not admissible.

    w, c = G e, mask: (R, in). N:M: (R, G, M, M), [r, g, a, b] = position a of group g (pruned) becomes
    kept and position b (kept) becomes pruned; ``constant`` is :func:`swap_constant` of the same rows,
    computed if not given. Unstructured: (R, in, in), [r, p, u] for pruned p and kept u (use on row
    chunks: it holds R * in^2 float64).
    """
    w, c, kept = w.to(torch.float64), c.to(torch.float64), mask.bool()
    t = 2 * w * c  # (R, in): 2 w_i c_i
    inf = torch.tensor(float("inf"), dtype=torch.float64, device=w.device)
    if isinstance(sparsity, NM):
        if constant is None:
            constant = swap_constant(w, gram, sparsity)
        shape = (w.shape[0], -1, sparsity.m)
        x = torch.where(kept, inf, -t).reshape(shape)  # a: must be pruned
        y = torch.where(kept, t, inf).reshape(shape)  # b: must be kept
        return (x.unsqueeze(-1) + y.unsqueeze(-2)).add_(constant)
    g = gram.to(torch.float64)
    sq = w * w * torch.diagonal(g)
    b = torch.where(kept, inf, sq - t)  # (R, in): keeping p alone
    a = torch.where(kept, sq + t, inf)  # (R, in): pruning u alone
    pair = w.unsqueeze(-1) * g * w.unsqueeze(-2)  # (R, in, in): w_p G_pu w_u
    return pair.mul_(-2).add_(b.unsqueeze(-1)).add_(a.unsqueeze(-2))


def _best_nm(w, c, g, mask, nm: NM, constant) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Best swap per row: (delta, p, u), each (R,); p, u are column indices."""
    delta = swap_deltas(w, c, g, mask, nm, constant)  # (R, G, M, M)
    best, flat = delta.reshape(w.shape[0], -1).min(dim=1)
    group, rest = flat // (nm.m * nm.m), flat % (nm.m * nm.m)
    return best, group * nm.m + rest // nm.m, group * nm.m + rest % nm.m


def _best_unstructured(w, c, g, mask, target, threshold, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Best swap among the k x k candidate pairs; the full scan for rows where none beats ``threshold``."""
    rows, cols = w.shape
    t = 2 * w * c
    sq = w * w * torch.diagonal(g)
    inf = torch.tensor(float("inf"), dtype=torch.float64, device=w.device)
    b_val, p_idx = torch.where(mask, inf, sq - t).topk(k, dim=1, largest=False)  # (R, k)
    a_val, u_idx = torch.where(mask, sq + t, inf).topk(k, dim=1, largest=False)
    pair = w.gather(1, p_idx).unsqueeze(-1) * g[p_idx.unsqueeze(-1), u_idx.unsqueeze(-2)] * w.gather(1, u_idx).unsqueeze(-2)
    delta = b_val.unsqueeze(-1) + a_val.unsqueeze(-2) - 2 * pair  # (R, k, k)
    best, flat = delta.reshape(rows, -1).min(dim=1)
    p = p_idx.gather(1, (flat // k).unsqueeze(1)).squeeze(1)
    u = u_idx.gather(1, (flat % k).unsqueeze(1)).squeeze(1)
    missed = (~(best < threshold)).nonzero().squeeze(1)
    chunk = max(1, _FULL_SCAN_ELEMENTS // (cols * cols))
    for r in missed.split(chunk):
        full = swap_deltas(w[r], c[r], g, mask[r], target).reshape(r.numel(), -1)  # (r, in * in)
        best[r], flat = full.min(dim=1)
        p[r], u[r] = flat // cols, flat % cols
    return best, p, u


def _check_mask(mask: torch.Tensor, weight: torch.Tensor, sparsity: SparsityTarget, what: str) -> None:
    if mask.shape != weight.shape:
        raise ValueError(f"{what}: warm-start mask {tuple(mask.shape)} does not match the weight {tuple(weight.shape)}")
    if isinstance(sparsity, NM):
        check_divisible(weight.shape[1], sparsity.m, what)
        assert_nm(mask, sparsity, f"{what} warm-start mask")
        return
    pruned = 1.0 - float(mask.sum()) / max(mask.numel(), 1)
    if abs(pruned - sparsity.sparsity) > 1.0 / weight.shape[1] + 1e-9:
        raise SparsityPatternError(
            f"{what}: the warm-start mask prunes {pruned:.4f} of the weights, not the target {sparsity.sparsity:g}; "
            "swaps keep each row's count, so start from a mask of the target sparsity"
        )


def sparseswaps(
    weight: torch.Tensor,
    gram: torch.Tensor,
    mask: torch.Tensor,
    sparsity: SparsityTarget,
    *,
    max_iters: int = 1000,
    refit: bool = False,
    tol: float = 1e-9,
    candidates: int = 16,
    what: str = "layer",
) -> SwapResult:
    """Refine the warm-start ``mask`` (bool (out, in), True = kept) by loss-decreasing swaps.

    At most ``max_iters`` swaps per row; a row stops when no admissible swap lowers its loss by more
    than ``tol`` times its current loss. ``refit`` re-fits the kept weights by least squares afterwards.
    ``candidates``: unstructured only, see the module docstring.
    """
    check_layer_inputs(weight, gram, what)
    _check_mask(mask, weight, sparsity, what)
    if max_iters < 0 or tol < 0 or candidates < 1:
        raise ValueError(f"{what}: need max_iters >= 0, tol >= 0 and candidates >= 1")
    g = gram.detach().to(torch.float64)
    g = (g + g.T) / 2  # the closed form assumes symmetry; X^T X from BLAS may differ in the last bit
    w_all = weight.detach().to(torch.float64)
    rows, cols = w_all.shape
    nm = sparsity if isinstance(sparsity, NM) else None
    k = min(candidates, cols)

    final_mask = mask.detach().bool().clone()
    c_all = (w_all * ~final_mask) @ g  # (R, in): c = G e per row
    loss_all = (c_all * w_all * ~final_mask).sum(dim=1)
    loss_before = loss_all.clone()
    noise_all = _NOISE * (w_all * w_all * torch.diagonal(g)).sum(dim=1)
    swaps_all = torch.zeros(rows, dtype=torch.int64, device=w_all.device)

    # Working set: the rows still improving (plus finished ones until the next compaction).
    work = torch.arange(rows, device=w_all.device)
    w, c, m, loss, noise = w_all, c_all, final_mask.clone(), loss_all.clone(), noise_all
    swaps = swaps_all.clone()
    const = swap_constant(w, g, nm) if nm is not None else None
    active = torch.ones(rows, dtype=torch.bool, device=w_all.device)
    for _ in range(max_iters):
        threshold = -(tol * loss.clamp_min(0) + noise)
        if nm is not None:
            best, p, u = _best_nm(w, c, g, m, nm, const)
        else:
            live = active.nonzero().squeeze(1)
            best = torch.full((w.shape[0],), float("inf"), dtype=torch.float64, device=w.device)
            p = torch.zeros(w.shape[0], dtype=torch.long, device=w.device)
            u = torch.zeros_like(p)
            best[live], p[live], u[live] = _best_unstructured(w[live], c[live], g, m[live], sparsity, threshold[live], k)
        active &= best < threshold
        if not active.any():
            break
        r = active.nonzero().squeeze(1)
        pr, ur = p[r], u[r]
        m[r, pr], m[r, ur] = True, False
        c[r] += w[r, ur].unsqueeze(1) * g[ur] - w[r, pr].unsqueeze(1) * g[pr]  # c += G d
        loss[r] += best[r]
        swaps[r] += 1
        if r.numel() <= work.numel() // 2:  # compact: finished rows leave the batch
            final_mask[work], swaps_all[work] = m, swaps
            work, w, c, m, loss, noise, swaps = (t[r] for t in (work, w, c, m, loss, noise, swaps))
            const = const[r] if const is not None else None
            active = active[r]
    final_mask[work], swaps_all[work] = m, swaps

    new_weight = w_all * final_mask
    loss_after = row_losses(w_all, g, final_mask)
    if refit:
        fitted = refit_kept(w_all, g, final_mask)
        fitted_loss = output_energy(w_all - fitted, g)
        better = fitted_loss < loss_after  # the damped solve can only be worse by rounding; keep the better
        new_weight = torch.where(better.unsqueeze(1), fitted, new_weight)
        loss_after = torch.where(better, fitted_loss, loss_after)
    return SwapResult(final_mask, new_weight.to(weight.dtype), swaps_all, loss_before, loss_after)


def refit_kept(w: torch.Tensor, gram: torch.Tensor, mask: torch.Tensor, damp: float = 1e-8) -> torch.Tensor:
    """(R, in) float64: per row, the weights supported on the kept set K that minimise the output error
    ||(w - w') X^T||^2, i.e. G_KK w'_K = (G w)_K; ``damp`` x mean(diag G) on the diagonal for singular G.
    Rows are solved in batches of equal kept count."""
    w, g, mask = w.to(torch.float64), gram.to(torch.float64), mask.bool()
    out = torch.zeros_like(w)
    rhs_all = w @ g  # (R, in): (G w)_K is its restriction (G symmetric)
    mean_diag = float(torch.diagonal(g).mean())
    lam = damp * mean_diag if mean_diag > 0 else 1.0
    counts = mask.sum(dim=1)
    for k in counts.unique().tolist():
        if k == 0:
            continue
        same = (counts == k).nonzero().squeeze(1)
        for r in same.split(max(1, _REFIT_ELEMENTS // (k * k))):
            idx = mask[r].nonzero()[:, 1].reshape(r.numel(), k)  # (n, k) kept columns per row
            g_kk = g[idx.unsqueeze(-1), idx.unsqueeze(-2)]  # (n, k, k)
            rhs = rhs_all[r].gather(1, idx).unsqueeze(-1)  # (n, k, 1)
            for attempt in range(6):
                eye = (lam * 10**attempt) * torch.eye(k, dtype=g.dtype, device=g.device)
                chol, info = torch.linalg.cholesky_ex(g_kk + eye)
                if not bool(info.any()):
                    break
            else:
                raise DataError("refit: the Gram matrix is not positive semi-definite; recompute the calibration statistics")
            out[r] = torch.zeros_like(out[r]).scatter_(1, idx, torch.cholesky_solve(rhs, chol).squeeze(-1))
    return out
