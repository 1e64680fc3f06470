"""SparseSwaps: the closed-form swap delta, monotone loss, local optimality, pattern and refit."""

import itertools

import pytest
import torch

from compressor.errors import SparsityPatternError
from compressor.methods.magnitude import magnitude_mask
from compressor.methods.sparseswaps import row_losses, sparseswaps, swap_constant, swap_deltas
from compressor.sparsity import NM, Unstructured, is_nm
from tests.methods.test_sparsegpt import correlated_problem


def _loss(w, g, mask):
    return row_losses(w, g, mask)


@pytest.mark.parametrize("nm", [NM(2, 4), NM(1, 4), NM(2, 8), NM(3, 8)], ids=str)
def test_closed_form_delta_equals_brute_force_for_every_swap(nm):
    w, g = correlated_problem(rows=3, cols=16, seed=1)
    w = w.double()
    mask = magnitude_mask(w, nm)
    c = (w * ~mask) @ g
    delta = swap_deltas(w, c, mask, nm, swap_constant(w, g, nm))
    base = _loss(w, g, mask)
    checked = 0
    for r, grp, a, b in itertools.product(range(3), range(16 // nm.m), range(nm.m), range(nm.m)):
        p, u = grp * nm.m + a, grp * nm.m + b
        if mask[r, p] or not mask[r, u]:
            assert delta[r, grp, a, b] == float("inf")
            continue
        swapped = mask.clone()
        swapped[r, p], swapped[r, u] = True, False
        assert delta[r, grp, a, b].item() == pytest.approx((_loss(w, g, swapped) - base)[r].item(), rel=1e-9, abs=1e-9)
        checked += 1
    assert checked == 3 * (16 // nm.m) * nm.n * (nm.m - nm.n)


def _brute_force_improves(w, g, mask, nm, tol):
    base = _loss(w, g, mask)
    for r in range(w.shape[0]):
        for grp in range(w.shape[1] // nm.m):
            for a, b in itertools.product(range(nm.m), range(nm.m)):
                p, u = grp * nm.m + a, grp * nm.m + b
                if not mask[r, p] and mask[r, u]:
                    s = mask.clone()
                    s[r, p], s[r, u] = True, False
                    if _loss(w, g, s)[r] < base[r] - tol * max(base[r].item(), 1e-12):
                        return True
    return False


@pytest.mark.parametrize("nm", [NM(2, 4), NM(1, 4), NM(2, 8)], ids=str)
def test_refined_mask_is_a_local_optimum_with_lower_loss(nm):
    w, g = correlated_problem(rows=8, cols=32, tokens=600, seed=2)
    start = magnitude_mask(w, nm)
    res = sparseswaps(w, g, start, nm)
    assert is_nm(res.mask, nm) and torch.equal(res.mask.sum(), start.sum())
    assert (res.loss_after <= res.loss_before + 1e-9).all()
    assert res.loss_after.sum() < 0.8 * res.loss_before.sum()
    torch.testing.assert_close(res.loss_after, _loss(w.double(), g, res.mask))
    torch.testing.assert_close(res.weight, w * res.mask)
    assert res.swaps_per_row.sum() > 0
    assert not _brute_force_improves(w.double(), g, res.mask, nm, tol=1e-9)


def test_loss_is_monotone_over_iterations():
    w, g = correlated_problem(rows=4, cols=32, tokens=600, seed=3)
    mask = magnitude_mask(w, NM(2, 4))
    losses = [_loss(w.double(), g, mask)]
    for _ in range(15):
        mask = sparseswaps(w, g, mask, NM(2, 4), max_iters=1).mask
        losses.append(_loss(w.double(), g, mask))
    for before, after in zip(losses, losses[1:]):
        assert (after <= before + 1e-9).all()
    assert losses[-1].sum() < losses[0].sum()


def test_refit_lowers_the_loss_further():
    w, g = correlated_problem(rows=8, cols=32, tokens=600, seed=4)
    res = sparseswaps(w, g, magnitude_mask(w, NM(2, 4)), NM(2, 4), refit=True)
    assert torch.equal(res.weight != 0, res.mask)
    refit_loss = ((w.double() - res.weight.double()) @ g * (w.double() - res.weight.double())).sum()
    assert refit_loss < res.loss_after.sum()


def test_bad_inputs():
    w, g = correlated_problem()
    with pytest.raises(SparsityPatternError, match="unstructured"):
        sparseswaps(w, g, magnitude_mask(w, Unstructured(0.5)), Unstructured(0.5))
    with pytest.raises(SparsityPatternError):
        sparseswaps(w, g, torch.ones_like(w, dtype=torch.bool), NM(2, 4))  # not a 2:4 mask
