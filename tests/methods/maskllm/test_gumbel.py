"""Pure Gumbel-Softmax pattern functions against brute-force references."""

from math import comb

import pytest
import torch

from compressor.methods.maskllm.gumbel import (
    gumbel_soft_mask, gumbel_softmax_probs, hard_mask, pattern_overlap, prior_offsets, sample_gumbel, soft_mask,
)
from compressor.sparsity import NM, assert_nm, is_nm, nm_patterns

NMS = [NM(1, 4), NM(2, 4), NM(2, 8), NM(4, 8)]


@pytest.mark.parametrize("nm", NMS, ids=str)
def test_pattern_enumeration(nm):
    patterns = nm_patterns(nm)
    assert patterns.shape == (comb(nm.m, nm.n), nm.m)
    assert (patterns.sum(1) == nm.n).all()
    assert len({tuple(p.tolist()) for p in patterns}) == patterns.shape[0]


@pytest.mark.parametrize("nm", NMS, ids=str)
def test_hard_mask_is_the_argmax_pattern_and_valid_nm(nm):
    patterns = nm_patterns(nm)
    logits = torch.randn(5, 24 // nm.m, patterns.shape[0], generator=torch.Generator().manual_seed(1))
    mask = hard_mask(logits, patterns.float())
    assert mask.dtype == torch.bool and mask.shape == (5, 24)
    assert_nm(mask, nm)
    assert (mask.reshape(5, -1, nm.m).sum(-1) == nm.n).all()
    for o in range(5):
        for g in range(24 // nm.m):
            best = max(range(patterns.shape[0]), key=lambda c: float(logits[o, g, c]))
            assert mask[o, g * nm.m:(g + 1) * nm.m].tolist() == patterns[best].tolist()


def test_soft_mask_matches_a_loop():
    nm = NM(2, 4)
    patterns = nm_patterns(nm).float()
    probs = torch.softmax(torch.randn(3, 5, 6), -1)
    mask = soft_mask(probs, patterns)
    assert mask.shape == (3, 20)
    for o in range(3):
        for g in range(5):
            for j in range(4):
                want = sum(float(probs[o, g, c] * patterns[c, j]) for c in range(6))
                assert float(mask[o, g * 4 + j]) == pytest.approx(want, abs=1e-6)
    torch.testing.assert_close(mask.reshape(3, 5, 4).sum(-1), torch.full((3, 5), 2.0))  # N per group


def test_cold_sample_with_large_kappa_equals_the_hard_mask():
    torch.manual_seed(0)
    patterns = nm_patterns(NM(2, 4)).float()
    logits = torch.randn(8, 4, 6) * 0.01
    # kappa times the smallest gap between a group's top two logits must dwarf the noise (|g| < ~17)
    top2 = logits.topk(2, dim=-1).values
    assert 1e7 * (top2[..., 0] - top2[..., 1]).min() > 100
    probs = gumbel_softmax_probs(logits, tau=1e-3, kappa=1e7, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(soft_mask(probs, patterns), hard_mask(logits, patterns).float(), atol=1e-5, rtol=0)
    warm = soft_mask(gumbel_softmax_probs(logits, tau=4.0, kappa=100.0, generator=torch.Generator()), patterns)
    assert ((warm > 0.05) & (warm < 0.95)).float().mean() > 0.5  # a warm sample is genuinely soft


def test_samples_follow_softmax_of_kappa_logits():
    # Gumbel-max: the argmax of a sample is pattern c with probability softmax(kappa * logits)[c].
    logits = torch.tensor([0.0, 0.005, 0.01, 0.015, -0.01, 0.002])
    draws = 20000
    probs = gumbel_softmax_probs(logits.expand(draws, 6), tau=0.05, kappa=100.0,
                                 generator=torch.Generator().manual_seed(3))
    freq = torch.bincount(probs.argmax(-1), minlength=6).float() / draws
    torch.testing.assert_close(freq, torch.softmax(100.0 * logits, -1), atol=0.015, rtol=0)


def test_noise_is_reproducible_and_finite():
    a = sample_gumbel((1000, 6), torch.Generator().manual_seed(7))
    b = sample_gumbel((1000, 6), torch.Generator().manual_seed(7))
    c = sample_gumbel((1000, 6), torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.dtype == torch.float32 and torch.isfinite(a).all()
    assert abs(float(a.mean()) - 0.5772) < 0.1  # Euler-Mascheroni: the Gumbel mean
    logits = torch.randn(3, 4, 6, dtype=torch.bfloat16)
    p = gumbel_softmax_probs(logits, 1.0, 100.0, torch.Generator().manual_seed(7))
    q = gumbel_softmax_probs(logits, 1.0, 100.0, torch.Generator().manual_seed(7))
    assert torch.equal(p, q) and p.dtype == torch.float32


def test_uniform_extremes_give_finite_noise(monkeypatch):
    # torch.rand may return exactly 0 (and some backends 1): neither may become log(0).
    monkeypatch.setattr(torch, "rand", lambda *a, **k: torch.tensor([0.0, 1.0, 0.5]))
    noise = sample_gumbel((3,))
    assert torch.isfinite(noise).all() and noise[0] < noise[2] < noise[1]


def test_extreme_temperature_and_scale_stay_finite():
    logits = torch.randn(4, 8, 6)
    for tau, kappa in [(1e-6, 1e4), (1e3, 1e-3)]:
        assert torch.isfinite(gumbel_softmax_probs(logits, tau, kappa)).all()
    with pytest.raises(ValueError, match="tau"):
        gumbel_softmax_probs(logits, 0.0, 1.0)


def test_straight_through_sample_is_one_hot_with_soft_gradient():
    logits = torch.randn(4, 3, 6, requires_grad=True)
    gen = torch.Generator().manual_seed(5)
    state = gen.get_state()
    hard = gumbel_softmax_probs(logits, 1.0, 1.0, gen, hard=True)
    gen.set_state(state)
    soft = gumbel_softmax_probs(logits, 1.0, 1.0, gen)
    assert ((hard == 0) | (hard == 1)).all() and (hard.sum(-1) == 1).all()
    assert torch.equal(hard.argmax(-1), soft.argmax(-1))
    weights = torch.randn(6)
    (g_hard,) = torch.autograd.grad((hard * weights).sum(), logits)
    (g_soft,) = torch.autograd.grad((soft * weights).sum(), logits)
    torch.testing.assert_close(g_hard, g_soft)


def test_prior_offsets_count_shared_kept_positions():
    nm = NM(2, 4)
    patterns = nm_patterns(nm)
    prior = torch.tensor([[1, 1, 0, 0, 0, 1, 0, 1]], dtype=torch.bool)
    overlap = pattern_overlap(prior, patterns)
    assert overlap.shape == (1, 2, 6)
    for g in range(2):
        for c in range(6):
            want = sum(int(prior[0, g * 4 + j] and patterns[c, j]) for j in range(4))
            assert overlap[0, g, c] == want
    offsets = prior_offsets(prior, patterns, nm.n)
    assert torch.equal(offsets, overlap - 1.0) and is_nm(prior, nm)


@pytest.mark.parametrize("nm", [NM(2, 4), NM(1, 4), NM(4, 8)])
@pytest.mark.parametrize("tau,kappa", [(4.0, 100.0), (0.5, 300.0)])
def test_fused_soft_mask_equals_the_composed_ops_forward_and_backward(nm, tau, kappa):
    torch.manual_seed(0)
    patterns = nm_patterns(nm).float()
    logits = (torch.randn(5, 3, patterns.shape[0]) * 0.01).requires_grad_(True)
    upstream = torch.randn(5, 3 * nm.m)  # d loss / d mask
    ref_logits = logits.detach().clone().requires_grad_(True)
    reference = soft_mask(gumbel_softmax_probs(ref_logits, tau, kappa, torch.Generator().manual_seed(3)), patterns)
    fused = gumbel_soft_mask(logits, tau, kappa, patterns, torch.Generator().manual_seed(3))
    torch.testing.assert_close(fused, reference, rtol=1e-5, atol=1e-6)
    (reference * upstream).sum().backward()
    (fused * upstream).sum().backward()
    # float32 rounding is amplified by kappa / tau (up to 600 here): compare against the largest entry
    scale = ref_logits.grad.abs().max()
    assert scale > 0
    torch.testing.assert_close(logits.grad / scale, ref_logits.grad / scale, rtol=0, atol=1e-5)


def test_cold_soft_masks_hold_no_denormal_numbers():
    # At the end of the schedule (tau 0.05, kappa 500) the losing patterns' weights underflow; as
    # denormals they would slow every CPU matrix product with W * mask about a hundredfold.
    torch.manual_seed(0)
    patterns = nm_patterns(NM(2, 4)).float()
    logits = (torch.randn(64, 32, 6) * 0.05).requires_grad_(True)
    mask = gumbel_soft_mask(logits, 0.05, 500.0, patterns, torch.Generator().manual_seed(1))
    weight = torch.randn(64, 128) * 0.02
    tiny = torch.finfo(torch.float32).tiny
    for values in (mask, weight * mask):
        assert not ((values != 0) & (values.abs() < tiny)).any()
    (weight * mask).sum().backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0
