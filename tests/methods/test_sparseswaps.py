"""SparseSwaps: the closed-form swap delta, monotone loss, local optimality, patterns and refit,
all against brute-force recomputation of e^T G e."""

import itertools

import pytest
import torch

from compressor.errors import NonFiniteError, SparsityPatternError
from compressor.methods.magnitude import magnitude_mask
from compressor.methods.sparsegpt import sparsegpt
from compressor.methods.sparseswaps import (
    NMSwapSlots,
    full_scan,
    refit_kept,
    row_losses,
    sparseswaps,
    swap_deltas,
)
from compressor.sparsity import NM, Unstructured, group_view, is_nm
from tests.methods.test_sparsegpt import correlated_inputs, correlated_problem, one_thread  # noqa: F401

TARGETS = [NM(2, 4), NM(1, 4), NM(2, 8), NM(3, 8), Unstructured(0.5)]


def brute_loss(w, g, mask):
    """e^T G e per row, written out without the package's helpers."""
    e = w.double() * ~mask
    return torch.einsum("ri,ij,rj->r", e, g, e)


def admissible_swaps(mask, target):
    """Every (row, p, u): pruned p and kept u, in the same group of M for N:M."""
    rows, cols = mask.shape
    for r, p, u in itertools.product(range(rows), range(cols), range(cols)):
        if mask[r, p] or not mask[r, u]:
            continue
        if isinstance(target, NM) and p // target.m != u // target.m:
            continue
        yield r, p, u


def swapped(mask, r, p, u):
    out = mask.clone()
    out[r, p], out[r, u] = True, False
    return out


def random_mask(rows, cols, target, seed):
    """A random warm start; N:M groups keep N, or fewer in some groups (still a valid N:M mask)."""
    g = torch.Generator().manual_seed(seed)
    if isinstance(target, NM):
        mask = magnitude_mask(torch.randn(rows, cols, generator=g), target)
        drop = (torch.rand(rows, cols, generator=g) < 0.1) & mask
        return mask & ~drop
    return magnitude_mask(torch.rand(rows, cols, generator=g), target)  # per layer: unequal counts per row


def test_every_closed_form_delta_equals_the_brute_force_change():
    for target in TARGETS:
        w, g = correlated_problem(rows=3, cols=16, seed=1)
        w = w.double()
        mask = random_mask(3, 16, target, seed=2)
        c = (w * ~mask) @ g
        delta = swap_deltas(w, c, g, mask, target)
        base = brute_loss(w, g, mask)
        expected = torch.full_like(delta, float("inf"))
        for r, p, u in admissible_swaps(mask, target):
            change = brute_loss(w, g, swapped(mask, r, p, u))[r] - base[r]
            index = (r, p // target.m, p % target.m, u % target.m) if isinstance(target, NM) else (r, p, u)
            expected[index] = change
        finite = torch.isfinite(expected)
        assert finite.sum() > 3 * (16 // 8)
        assert torch.equal(torch.isfinite(delta), finite), target  # +inf exactly where not admissible
        torch.testing.assert_close(delta[finite], expected[finite], rtol=1e-9, atol=1e-9 * float(base.max()))


@pytest.mark.parametrize("target", [NM(2, 4), NM(1, 4), NM(2, 8), NM(3, 8)], ids=str)
def test_slot_table_gives_the_best_admissible_swap_as_swaps_are_made(target):
    w, g = correlated_problem(rows=5, cols=32, seed=3)
    w = w.double()
    mask = random_mask(5, 32, target, seed=4)
    slots = NMSwapSlots(w, g, mask, target)
    for step in range(6):
        c = (w * ~mask) @ g
        reference = swap_deltas(w, c, g, mask, target).reshape(5, -1).min(dim=1).values
        best, p, u, group = slots.best(w, c)
        torch.testing.assert_close(best, reference, rtol=1e-12, atol=1e-9)
        assert (~mask[torch.arange(5), p]).all() and mask[torch.arange(5), u].all()
        assert torch.equal(p // target.m, group) and torch.equal(u // target.m, group)
        rows = torch.arange(step % 2, 5, 2)  # swap in some rows only
        slots.swap(rows, group[rows], p[rows], u[rows])
        mask[rows, p[rows]], mask[rows, u[rows]] = True, False


def test_full_scan_finds_the_best_of_all_unstructured_swaps():
    w, g = correlated_problem(rows=6, cols=24, seed=5)
    w = w.double()
    mask = random_mask(6, 24, Unstructured(0.5), seed=6)
    mask[0] = True  # a row with nothing pruned: no admissible swap
    c = (w * ~mask) @ g
    best, p, u = full_scan(w, c, g, mask)
    reference = swap_deltas(w, c, g, mask, Unstructured(0.5)).reshape(6, -1).min(dim=1).values
    assert best[0] == float("inf")
    torch.testing.assert_close(best, reference, rtol=1e-12, atol=1e-9)
    rows = torch.arange(1, 6)
    assert (~mask[rows, p[rows]]).all() and mask[rows, u[rows]].all()


def local_improvement(w, g, mask, target):
    """The best relative improvement any single admissible swap makes, by brute force."""
    base = brute_loss(w, g, mask)
    best = 0.0
    for r, p, u in admissible_swaps(mask, target):
        gain = float(base[r] - brute_loss(w, g, swapped(mask, r, p, u))[r]) / max(float(base[r]), 1e-300)
        best = max(best, gain)
    return best


@pytest.mark.parametrize("target", TARGETS, ids=str)
def test_refined_mask_is_a_local_optimum_with_much_lower_loss(target):
    w, g = correlated_problem(rows=8, cols=32, tokens=600, seed=7)
    start = magnitude_mask(w, target)  # unstructured: per-layer, so rows prune different counts
    res = sparseswaps(w, g, start, target)
    assert (res.swaps_per_row < 1000).all() and res.swaps_per_row.sum() > 0  # converged, not capped
    assert local_improvement(w, g, res.mask, target) <= 1e-9
    assert res.loss_after.sum() < 0.6 * res.loss_before.sum()
    assert (res.loss_after <= res.loss_before * (1 + 1e-12)).all()
    torch.testing.assert_close(res.loss_before, brute_loss(w, g, start))
    torch.testing.assert_close(res.loss_after, brute_loss(w, g, res.mask))
    assert torch.equal(res.weight, w * res.mask)
    if isinstance(target, NM):  # the pattern, and the count of every group, are kept
        assert is_nm(res.mask, target)
        assert torch.equal(group_view(res.mask, target.m).sum(-1), group_view(start, target.m).sum(-1))
    assert torch.equal(res.mask.sum(1), start.sum(1))


@pytest.mark.parametrize("candidates", [1, 3])
def test_unstructured_rows_end_at_a_local_optimum_whatever_the_candidate_count(candidates):
    """Few candidates miss improving swaps; the full scan must find them before a row stops."""
    w, g = correlated_problem(rows=6, cols=40, tokens=600, seed=16)
    target = Unstructured(0.5)
    res = sparseswaps(w, g, magnitude_mask(w, target), target, candidates=candidates)
    assert (res.swaps_per_row < 1000).all()
    assert local_improvement(w, g, res.mask, target) <= 1e-9
    assert torch.equal(res.mask.sum(1), magnitude_mask(w, target).sum(1))


@pytest.mark.parametrize("target", [NM(2, 4), NM(2, 8), Unstructured(0.5)], ids=str)
def test_loss_never_increases_from_one_swap_to_the_next(target):
    w, g = correlated_problem(rows=6, cols=32, tokens=600, seed=8)
    mask = random_mask(6, 32, target, seed=9)
    losses = [brute_loss(w, g, mask)]
    for _ in range(25):
        res = sparseswaps(w, g, mask, target, max_iters=1)
        changed = (res.mask != mask).sum(1)
        assert torch.equal(changed, 2 * res.swaps_per_row) and (res.swaps_per_row <= 1).all()
        mask = res.mask
        losses.append(brute_loss(w, g, mask))
        assert (losses[-1][changed > 0] < losses[-2][changed > 0]).all()  # each swap strictly improves
        assert torch.equal(losses[-1][changed == 0], losses[-2][changed == 0])
    assert losses[-1].sum() < 0.8 * losses[0].sum()


def test_iteration_cap_and_warm_start_from_sparsegpt():
    w, g = correlated_problem(rows=8, cols=32, tokens=600, seed=10)
    start = sparsegpt(w, g, NM(2, 4), update_weights=False).mask
    capped = sparseswaps(w, g, start, NM(2, 4), max_iters=2)
    assert capped.swaps_per_row.max() <= 2
    untouched = sparseswaps(w, g, start, NM(2, 4), max_iters=0)
    assert torch.equal(untouched.mask, start) and not untouched.swaps_per_row.any()
    full = sparseswaps(w, g, start, NM(2, 4))
    assert full.loss_after.sum() < full.loss_before.sum()


def test_invariant_to_a_power_of_two_scale_of_the_gram_matrix():
    w, g = correlated_problem(rows=8, cols=32, tokens=600, seed=11)
    for target in (NM(2, 4), Unstructured(0.5)):
        start = magnitude_mask(w, target)
        a = sparseswaps(w, g, start, target)
        b = sparseswaps(w, g * 1024.0, start, target)
        assert torch.equal(a.mask, b.mask) and torch.equal(a.swaps_per_row, b.swaps_per_row)


@pytest.mark.parametrize("target", [NM(2, 4), Unstructured(0.5)], ids=str)
def test_refit_is_the_least_squares_fit_on_the_kept_support(target):
    x = correlated_inputs(32, 600, seed=12)
    g = x.T @ x
    w = torch.randn(8, 32, generator=torch.Generator().manual_seed(13))
    res = sparseswaps(w, g, magnitude_mask(w, target), target, refit=True)
    plain = sparseswaps(w, g, magnitude_mask(w, target), target)
    assert torch.equal(res.mask, plain.mask) and torch.equal(res.weight != 0, res.mask)
    assert (res.loss_after < plain.loss_after).all()
    delta = w.double() - res.weight.double()
    torch.testing.assert_close(res.loss_after, torch.einsum("ri,ij,rj->r", delta, g, delta))
    for r in range(8):  # independent reference: least squares on the inputs themselves
        kept = res.mask[r]
        ref = torch.linalg.lstsq(x[:, kept], x @ w[r].double()).solution
        torch.testing.assert_close(res.weight[r, kept].double(), ref, rtol=1e-4, atol=1e-5)


def test_refit_handles_a_singular_gram_matrix():
    x = correlated_inputs(16, 6, seed=14)  # 6 tokens: G has rank 6 of 16
    g = x.T @ x
    g[:, 3] = g[3, :] = 0  # and a dead input
    w = torch.randn(4, 16, generator=torch.Generator().manual_seed(15)).double()
    mask = magnitude_mask(w, NM(2, 4))
    fitted = refit_kept(w, g, mask)
    assert torch.isfinite(fitted).all() and torch.equal(fitted != 0, mask & (torch.arange(16) != 3))
    assert (row_losses(w - fitted, g, torch.zeros_like(mask)) <= row_losses(w, g, mask) * (1 + 1e-9)).all()


def test_bad_inputs_are_named():
    w, g = correlated_problem(rows=4, cols=16)
    with pytest.raises(SparsityPatternError, match="warm-start mask"):
        sparseswaps(w, g, torch.ones_like(w, dtype=torch.bool), NM(2, 4))  # not a 2:4 mask
    with pytest.raises(SparsityPatternError, match="not the target 0.5"):
        sparseswaps(w, g, magnitude_mask(w, Unstructured(0.25)), Unstructured(0.5))
    with pytest.raises(SparsityPatternError, match="not divisible"):
        sparseswaps(w[:, :14], g[:14, :14], torch.ones(4, 14, dtype=torch.bool), NM(2, 4))
    with pytest.raises(ValueError, match="does not match"):
        sparseswaps(w, g, magnitude_mask(w, NM(2, 4))[:, :8], NM(2, 4))
    bad = g.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="Gram"):
        sparseswaps(w, bad, magnitude_mask(w, NM(2, 4)), NM(2, 4))
    w32, g32 = correlated_problem(rows=2, cols=32)
    with pytest.raises(SparsityPatternError, match="M <= 16"):
        sparseswaps(w32, g32, magnitude_mask(w32, NM(2, 32)), NM(2, 32))
