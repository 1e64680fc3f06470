"""PDP against a dense reference: the threshold between the N-th and (N+1)-th largest |w| of each group
(or of the layer), the soft mask's formula and gradient with t and tau constant, and a final mask that
is exactly N:M and the top-N (which is m >= 0.5)."""

import itertools

import pytest
import torch

from compressor.methods.sparse_training import PDPWeight, pdp_hard_mask, pdp_soft_mask, pdp_threshold_sq
from compressor.sparsity import NM, Unstructured, is_nm


def _brute_threshold(w: torch.Tensor, nm: NM) -> torch.Tensor:
    t2 = torch.zeros(w.shape[0], w.shape[1] // nm.m)
    for r, g in itertools.product(range(w.shape[0]), range(w.shape[1] // nm.m)):
        mags = sorted((float(w[r, c]) ** 2 for c in range(g * nm.m, (g + 1) * nm.m)), reverse=True)
        t2[r, g] = 0.5 * (mags[nm.n - 1] + mags[nm.n])
    return t2


def _reference_mask(w: torch.Tensor, nm: NM, tau_rel: float, ramp: float) -> torch.Tensor:
    t2 = _brute_threshold(w.detach(), nm).repeat_interleave(nm.m, dim=1)  # constants of the step
    tau = tau_rel * float(_brute_threshold(w.detach(), nm).mean())
    m = torch.sigmoid((w.float() ** 2 - t2) / tau)
    return 1 - ramp * (1 - m)


@pytest.mark.parametrize("nm", [NM(2, 4), NM(1, 4), NM(3, 8)])
def test_threshold_lies_between_the_nth_and_next_magnitude(nm):
    w = torch.randn(5, 16, generator=torch.Generator().manual_seed(0))
    t2 = pdp_threshold_sq(w, nm)
    assert t2.shape == (5, 16 // nm.m, 1)
    assert torch.allclose(t2.squeeze(-1), _brute_threshold(w, nm))


def test_unstructured_threshold_is_per_layer():
    w = torch.randn(6, 10, generator=torch.Generator().manual_seed(1))
    mags = sorted((w.flatten() ** 2).tolist())
    pruned = int(60 * 0.7)
    assert float(pdp_threshold_sq(w, Unstructured(0.7))) == pytest.approx(0.5 * (mags[pruned - 1] + mags[pruned]))
    hard = pdp_hard_mask(w, Unstructured(0.7))
    assert int(hard.sum()) == 60 - pruned
    assert torch.equal(hard, pdp_soft_mask(w, Unstructured(0.7), 0.1) >= 0.5)


@pytest.mark.parametrize("ramp", [1.0, 0.4])
def test_soft_mask_and_its_gradient_match_the_formula(ramp):
    nm = NM(2, 4)
    w0 = torch.randn(4, 12, generator=torch.Generator().manual_seed(2))
    w = w0.clone().requires_grad_(True)
    ref_w = w0.clone().requires_grad_(True)
    mask = pdp_soft_mask(w, nm, tau_rel=0.2, ramp=ramp)
    ref = _reference_mask(ref_w, nm, 0.2, ramp)
    assert torch.allclose(mask, ref, atol=1e-6)
    upstream = torch.randn(4, 12, generator=torch.Generator().manual_seed(3))
    (w * mask * upstream).sum().backward()
    (ref_w * ref * upstream).sum().backward()
    assert torch.allclose(w.grad, ref_w.grad, atol=1e-5)


def test_final_mask_is_exactly_nm_and_the_top_n():
    nm = NM(2, 4)
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(4))
    hard = pdp_hard_mask(w, nm)
    assert is_nm(hard, nm) and int(hard.sum()) == 32 * 64 // 2
    top = torch.zeros_like(hard).reshape(32, 16, 4).scatter_(-1, w.abs().reshape(32, 16, 4).topk(2, -1).indices, True)
    assert torch.equal(hard, top.reshape(32, 64))
    assert torch.equal(hard, pdp_soft_mask(w, nm, 0.05) >= 0.5)  # no ties: m >= 0.5 is the top-N
    ties = torch.ones(2, 4)
    assert is_nm(pdp_hard_mask(ties, nm), nm) and int(pdp_hard_mask(ties, nm).sum()) == 4  # ties: still exact


def test_parametrization_trains_soft_and_evaluates_hard():
    nm = NM(2, 4)
    w = torch.randn(3, 8, generator=torch.Generator().manual_seed(5))
    rule = PDPWeight(nm, (3, 8))
    rule.set_schedule(0.3, 0.5)
    rule.train(True)
    assert torch.allclose(rule(w), w * pdp_soft_mask(w, nm, 0.3, 0.5))
    rule.train(False)
    assert torch.equal(rule(w), w * pdp_hard_mask(w, nm))
    with pytest.raises(ValueError, match="ramp"):
        rule.set_schedule(0.1, 1.5)
