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
from functools import lru_cache

import torch
import torch.nn.functional as F

from compressor.errors import DataError, SparsityPatternError
from compressor.methods.objective import output_energy
from compressor.methods.sparsegpt import check_layer_inputs
from compressor.sparsity import NM, SparsityTarget, assert_nm, check_divisible

_BATCH_ELEMENTS = 1 << 23  # rows x in x M: rows refined together (large batches amortise per-op overhead)
_FULL_SCAN_ELEMENTS = 1 << 19  # (rows, |P|, in) entries per chunk of an unstructured full scan
_REFIT_ELEMENTS = 1 << 22  # (rows, k, k) entries per chunk of the batched least-squares solve
_NOISE = 1e-13  # deltas below this fraction of sum_i w_i^2 G_ii are rounding noise, never taken
Tensor = torch.Tensor


@dataclass
class SwapResult:
    mask: Tensor  # bool (out, in), True = kept
    weight: Tensor  # (out, in) in the input dtype: W * mask, or the re-fitted kept weights
    swaps_per_row: Tensor  # (out,) int64
    loss_before: Tensor  # (out,) float64, e^T G e of the warm-start mask
    loss_after: Tensor  # (out,) float64, output error of the returned weight (after refit if any)


def row_losses(weight: Tensor, gram: Tensor, mask: Tensor) -> Tensor:
    """(out,) float64: e^T G e per row, e = the weights that ``mask`` prunes."""
    return output_energy(weight.to(torch.float64) * ~mask.bool(), gram)


def swap_constant(w: Tensor, gram: Tensor, nm: NM) -> Tensor:
    """(R, G, M, M) float64, [r, g, a, b] = w_a^2 G_aa + w_b^2 G_bb - 2 w_a w_b G_ab within group g:
    the part of a swap's delta that depends on w and G only (a, b: positions inside the group)."""
    w = w.to(torch.float64)
    cols = w.shape[1]
    idx = torch.arange(cols, device=w.device).reshape(cols // nm.m, nm.m)
    blocks = gram.to(torch.float64)[idx.unsqueeze(-1), idx.unsqueeze(-2)]  # (G, M, M) within-group blocks
    wg = w.reshape(w.shape[0], -1, nm.m)  # (R, G, M)
    sq = wg * wg * torch.diagonal(blocks, dim1=-2, dim2=-1)  # w_i^2 G_ii
    return sq.unsqueeze(-1) + sq.unsqueeze(-2) - 2 * wg.unsqueeze(-1) * wg.unsqueeze(-2) * blocks


def swap_deltas(w: Tensor, c: Tensor, gram: Tensor, mask: Tensor, sparsity: SparsityTarget) -> Tensor:
    """Loss change of every swap of each row, +inf where a swap is not admissible (the reference form).

    w, c = G e, mask: (R, in). N:M: (R, G, M, M), [r, g, a, b] = position a of group g (pruned) becomes
    kept and position b (kept) becomes pruned. Unstructured: (R, in, in), [r, p, u] for pruned p and
    kept u (R * in^2 float64: for small problems and tests; the search uses :func:`full_scan`).
    """
    w, c, kept = w.to(torch.float64), c.to(torch.float64), mask.bool()
    t = 2 * w * c  # (R, in): 2 w_i c_i
    inf = torch.tensor(float("inf"), dtype=torch.float64, device=w.device)
    if isinstance(sparsity, NM):
        shape = (w.shape[0], -1, sparsity.m)
        x = torch.where(kept, inf, -t).reshape(shape)  # a: must be pruned
        y = torch.where(kept, t, inf).reshape(shape)  # b: must be kept
        return (x.unsqueeze(-1) + y.unsqueeze(-2)).add_(swap_constant(w, gram, sparsity))
    g = gram.to(torch.float64)
    b, a = _singles(w, c, g, kept)
    pair = w.unsqueeze(-1) * g * w.unsqueeze(-2)  # (R, in, in): w_p G_pu w_u
    return pair.mul_(-2).add_(b.unsqueeze(-1)).add_(a.unsqueeze(-2))


@lru_cache(maxsize=None)
def pair_tables(m: int, counts: tuple[int, ...]) -> tuple[Tensor, Tensor, Tensor]:
    """The admissible swaps of a group of M, by its bit-code (bit i set = position i kept).

    Returns (a, b, valid), each (2^M, S): slot s of a group with code k swaps pruned position a[k, s]
    with kept position b[k, s] if valid[k, s]. S is the most swaps any code with a kept count in
    ``counts`` admits (swaps keep the count of each group, so codes of other counts never occur).
    """
    if m > 16:
        raise SparsityPatternError(f"SparseSwaps supports N:M groups of M <= 16, got M={m}")
    pairs = []
    for code in range(1 << m):
        kept = [i for i in range(m) if code >> i & 1]
        pruned = [i for i in range(m) if not code >> i & 1]
        pairs.append([(i, j) for i in pruned for j in kept] if len(kept) in counts else [])
    slots = max(1, max(len(p) for p in pairs))
    padded = torch.tensor([p + [(0, 0)] * (slots - len(p)) for p in pairs], dtype=torch.long)  # (2^M, S, 2)
    valid = torch.tensor([[True] * len(p) + [False] * (slots - len(p)) for p in pairs], dtype=torch.bool)
    return padded[..., 0].contiguous(), padded[..., 1].contiguous(), valid.reshape(1 << m, slots)


class NMSwapSlots:
    """The admissible swaps of every (row, group) in slot form, kept current as swaps are made.

    code (R, G): group bit-codes; pa, pb (R, G, S): positions in the group of each slot's pruned and
    kept weight; cst (R, G, S): the slot's :func:`swap_constant` entry, +inf for unused slots. A delta
    is then cst + t_b - t_a (t = 2 w c), i.e. S values per group instead of M x M.
    """

    def __init__(self, w: Tensor, g: Tensor, mask: Tensor, nm: NM) -> None:
        self.m = nm.m
        groups = mask.reshape(mask.shape[0], -1, nm.m)  # (R, G, M)
        bits = 1 << torch.arange(nm.m, device=mask.device)
        self.code = (groups.long() * bits).sum(dim=-1)  # (R, G)
        counts = tuple(groups.sum(dim=-1).unique().tolist())
        self.a_tab, self.b_tab, self.valid_tab = (t.to(mask.device) for t in pair_tables(nm.m, counts))
        self.const = swap_constant(w, g, nm).reshape(*self.code.shape, nm.m * nm.m)  # (R, G, M * M)
        self.pa, self.pb, self.cst = self._slots(self.code, self.const)

    def _slots(self, code: Tensor, const: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        pa, pb = self.a_tab[code], self.b_tab[code]
        cst = const.gather(-1, pa * self.m + pb).masked_fill_(~self.valid_tab[code], float("inf"))
        return pa, pb, cst

    def best(self, w: Tensor, c: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Per row: (delta, p, u, group) of the best swap; p, u are column indices."""
        rows = w.shape[0]
        t = torch.mul(w, c).mul_(2).reshape(rows, -1, self.m)  # (R, G, M)
        delta = t.gather(-1, self.pb).sub_(t.gather(-1, self.pa)).add_(self.cst)  # (R, G, S)
        best, flat = delta.reshape(rows, -1).min(dim=1)
        slots = self.pa.shape[-1]
        group, slot = flat // slots, flat % slots
        r = torch.arange(rows, device=w.device)
        return best, group * self.m + self.pa[r, group, slot], group * self.m + self.pb[r, group, slot], group

    def swap(self, r: Tensor, group: Tensor, p: Tensor, u: Tensor) -> None:
        """Record swaps (pruned column p becomes kept, kept u becomes pruned) in rows r."""
        self.code[r, group] ^= (1 << (p % self.m)) | (1 << (u % self.m))
        pa, pb, cst = self._slots(self.code[r, group], self.const[r, group])
        self.pa[r, group], self.pb[r, group], self.cst[r, group] = pa, pb, cst

    def keep_rows(self, r: Tensor) -> None:
        self.code, self.const, self.pa, self.pb, self.cst = (
            t[r] for t in (self.code, self.const, self.pa, self.pb, self.cst)
        )


def _singles(w: Tensor, c: Tensor, g: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """(b, a), each (R, in) float64: b_p (keeping pruned p alone), +inf where kept; a_u (pruning kept u
    alone), +inf where pruned."""
    t = 2 * w * c
    sq = w * w * torch.diagonal(g)
    inf = torch.tensor(float("inf"), dtype=torch.float64, device=w.device)
    return torch.where(mask, inf, sq - t), torch.where(mask, sq + t, inf)


def full_scan(w: Tensor, c: Tensor, g: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Unstructured: the best of all |P| x |K| swaps of each row, (delta, p, u), each (R,).

    For each pruned p, min over u of a_u - 2 w_p w_u G_pu runs over whole rows of G (contiguous, +inf
    at pruned u); rows may prune different counts, so each row's pruned columns are listed first and
    padded with kept ones, whose b_p = +inf. Chunks of rows bound the (rows, |P|, in) temporary."""
    rows, cols = w.shape
    best = torch.full((rows,), float("inf"), dtype=torch.float64, device=w.device)
    p = torch.zeros(rows, dtype=torch.long, device=w.device)
    u = torch.zeros_like(p)
    p_max = int((~mask).sum(dim=1).max()) if rows else 0
    if p_max == 0:
        return best, p, u
    b_all, a_all = _singles(w, c, g, mask)
    p_idx = mask.to(torch.uint8).argsort(dim=1, stable=True)[:, :p_max]  # (R, P): pruned columns first
    for r in torch.arange(rows, device=w.device).split(max(1, _FULL_SCAN_ELEMENTS // (p_max * cols))):
        pi = p_idx[r]
        pair = g.index_select(0, pi.reshape(-1)).reshape(r.numel(), p_max, cols)  # (n, P, in): G_pu
        pair.mul_(w[r].unsqueeze(1)).mul_(-2 * w[r].gather(1, pi).unsqueeze(-1)).add_(a_all[r].unsqueeze(1))
        per_p, per_p_u = pair.min(dim=2)  # (n, P): best partner of each p
        best[r], slot = (per_p + b_all[r].gather(1, pi)).min(dim=1)
        p[r] = pi.gather(1, slot.unsqueeze(1)).squeeze(1)
        u[r] = per_p_u.gather(1, slot.unsqueeze(1)).squeeze(1)
    return best, p, u


def _best_unstructured(
    w: Tensor, c: Tensor, g: Tensor, mask: Tensor, threshold: Tensor, k: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Best swap among the k x k candidate pairs (lowest b_p x lowest a_u); the full scan for rows
    where none beats ``threshold``. Returns (delta, p, u), each (R,)."""
    b_all, a_all = _singles(w, c, g, mask)
    b, p_idx = b_all.topk(k, dim=1, largest=False)  # (R, k)
    a, u_idx = a_all.topk(k, dim=1, largest=False)
    pair = g.take(p_idx.unsqueeze(-1) * g.shape[1] + u_idx.unsqueeze(-2))  # (R, k, k): G_pu
    pair.mul_(w.gather(1, p_idx).unsqueeze(-1)).mul_(w.gather(1, u_idx).unsqueeze(-2)).mul_(-2)
    best, flat = pair.add_(b.unsqueeze(-1)).add_(a.unsqueeze(-2)).reshape(w.shape[0], -1).min(dim=1)
    p = p_idx.gather(1, (flat // k).unsqueeze(1)).squeeze(1)
    u = u_idx.gather(1, (flat % k).unsqueeze(1)).squeeze(1)
    missed = (~(best < threshold)).nonzero().squeeze(1)
    if missed.numel():
        best[missed], p[missed], u[missed] = full_scan(w[missed], c[missed], g, mask[missed])
    return best, p, u


def _check_mask(mask: Tensor, weight: Tensor, sparsity: SparsityTarget, what: str) -> None:
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


def _refine_rows(
    w: Tensor, g: Tensor, mask: Tensor, sparsity: SparsityTarget, max_iters: int, tol: float, k: int
) -> tuple[Tensor, Tensor]:
    """Swap until no row of this batch improves: (mask, swaps per row). w float64 (R, in), mask (R, in)."""
    rows = w.shape[0]
    nm = sparsity if isinstance(sparsity, NM) else None
    final_mask, swaps_all = mask.clone(), torch.zeros(rows, dtype=torch.int64, device=w.device)
    c = (w * ~mask) @ g  # (R, in): c = G e per row
    loss = (c * w * ~mask).sum(dim=1)
    noise = _NOISE * (w * w * torch.diagonal(g)).sum(dim=1)
    work, m, swaps = torch.arange(rows, device=w.device), mask.clone(), swaps_all.clone()
    active = torch.ones(rows, dtype=torch.bool, device=w.device)
    slots = NMSwapSlots(w, g, m, nm) if nm is not None else None
    for _ in range(max_iters):
        threshold = -(tol * loss.clamp_min(0) + noise)
        if slots is not None:
            best, p, u, group = slots.best(w, c)
        else:
            best, p, u = _best_unstructured(w, c, g, m, threshold, k)
        active &= best < threshold
        if not active.any():
            break
        r = active.nonzero().squeeze(1)
        pr, ur = p[r], u[r]
        m[r, pr], m[r, ur] = True, False
        if slots is not None:
            slots.swap(r, group[r], pr, ur)
        # c += G d = w_u G[u] - w_p G[p]: a weighted sum of two rows of G per row, without gathering them
        coef = torch.stack([w[r, ur], -w[r, pr]], 1)
        c.index_add_(0, r, F.embedding_bag(torch.stack([ur, pr], 1), g, per_sample_weights=coef, mode="sum"))
        loss[r] += best[r]
        swaps[r] += 1
        # Finished rows leave the batch: at once for unstructured (they would cost a full scan per
        # iteration), once half of the batch is done for N:M (copying costs as much as an iteration).
        if r.numel() < work.numel() and (slots is None or r.numel() <= work.numel() // 2):
            final_mask[work], swaps_all[work] = m, swaps
            work, w, c, m, loss, noise, swaps, active = (t[r] for t in (work, w, c, m, loss, noise, swaps, active))
            if slots is not None:
                slots.keep_rows(r)
    final_mask[work], swaps_all[work] = m, swaps
    return final_mask, swaps_all


def sparseswaps(
    weight: Tensor,
    gram: Tensor,
    mask: Tensor,
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
    w = weight.detach().to(torch.float64)
    start = mask.detach().bool()
    k = min(candidates, w.shape[1])
    loss_before = row_losses(w, g, start)
    final_mask = torch.empty_like(start)
    swaps = torch.empty(w.shape[0], dtype=torch.int64, device=w.device)
    per_row = w.shape[1] * (sparsity.m if isinstance(sparsity, NM) else candidates)  # swap_constant / candidate size
    batch = max(1, _BATCH_ELEMENTS // per_row)
    for r0 in range(0, w.shape[0], batch):
        sl = slice(r0, r0 + batch)
        final_mask[sl], swaps[sl] = _refine_rows(w[sl], g, start[sl], sparsity, max_iters, tol, k)

    new_weight = w * final_mask
    loss_after = row_losses(w, g, final_mask)
    if refit:
        fitted = refit_kept(w, g, final_mask)
        fitted_loss = output_energy(w - fitted, g)
        better = fitted_loss < loss_after  # the damped solve can only be worse by rounding; keep the better
        new_weight = torch.where(better.unsqueeze(1), fitted, new_weight)
        loss_after = torch.where(better, fitted_loss, loss_after)
    return SwapResult(final_mask, new_weight.to(weight.dtype), swaps, loss_before, loss_after)


def refit_kept(w: Tensor, gram: Tensor, mask: Tensor, damp: float = 1e-8) -> Tensor:
    """(R, in) float64: per row, the weights supported on the kept set K that minimise the output error
    ||(w - w') X^T||^2, i.e. G_KK w'_K = (G w)_K; ``damp`` x mean(diag G) on the diagonal for singular G.
    Rows are solved in batches of equal kept count."""
    w, g, mask = w.to(torch.float64), gram.to(torch.float64).contiguous(), mask.bool()
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
            g_kk = g.take(idx.unsqueeze(-1) * g.shape[1] + idx.unsqueeze(-2))  # (n, k, k): G_KK
            rhs = rhs_all[r].gather(1, idx).unsqueeze(-1)  # (n, k, 1)
            for attempt in range(6):
                eye = (lam * 10**attempt) * torch.eye(k, dtype=g.dtype, device=g.device)
                chol, info = torch.linalg.cholesky_ex(g_kk + eye)
                if not bool(info.any()):
                    break
            else:
                raise DataError("refit: the Gram matrix is not positive semi-definite; recompute the statistics")
            out[r] = torch.zeros_like(out[r]).scatter_(1, idx, torch.cholesky_solve(rhs, chol).squeeze(-1))
    return out
