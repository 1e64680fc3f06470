import math

import numpy as np
import pytest
import torch

from compressor.search.fitness import FitnessTotal, kl_divergence, perplexity_from_logits, token_kl, token_nll


def _direct_kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> float:
    """sum_v p log(p / q) per row straight from the definition (numpy float64), mean over rows."""
    p = np.exp(p_logits.double().numpy())
    p /= p.sum(-1, keepdims=True)
    q = np.exp(q_logits.double().numpy())
    q /= q.sum(-1, keepdims=True)
    return float((p * np.log(p / q)).sum(-1).mean())


def test_kl_against_the_definition():
    g = torch.Generator().manual_seed(0)
    dense = torch.randn(300, 50, generator=g) * 3  # 300 rows: more than one chunk
    cand = dense + torch.randn(300, 50, generator=g) * 0.5
    assert kl_divergence(dense, cand) == pytest.approx(_direct_kl(dense, cand), rel=1e-12)
    assert kl_divergence(dense.reshape(3, 100, 50), cand.reshape(3, 100, 50)) == pytest.approx(_direct_kl(dense, cand))
    assert kl_divergence(dense, dense) == 0.0
    assert (token_kl(dense, cand) >= 0).all()


def test_kl_is_stable_for_huge_logits_and_shift_invariant():
    dense = torch.tensor([[1000.0, 0.0]])
    cand = torch.tensor([[0.0, 1000.0]])
    # p = (1, e^-1000), q = (e^-1000, 1): KL = log p0 - log q0 = 1000 (the other term vanishes)
    assert kl_divergence(dense, cand) == pytest.approx(1000.0)
    assert kl_divergence(dense + 1e4, cand - 3e4) == pytest.approx(1000.0)
    # in float64, so that x + 50 keeps x's digits
    x = torch.randn(4, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    assert kl_divergence(x, x * 0.9) == pytest.approx(kl_divergence(x + 50.0, x * 0.9 - 20.0), rel=1e-9)
    # a float32 pair too close for float32 softmax differences still gets its float64 KL
    base = torch.randn(8, 1000, generator=torch.Generator().manual_seed(1))
    near = base + 1e-4 * torch.randn(8, 1000, generator=torch.Generator().manual_seed(2))
    assert kl_divergence(base, near) == pytest.approx(_direct_kl(base, near), rel=1e-6)


def test_kl_handles_impossible_tokens_of_the_dense_model():
    dense = torch.tensor([[0.0, -math.inf, 0.0]])
    cand = torch.tensor([[0.0, 0.0, 0.0]])
    assert kl_divergence(dense, cand) == pytest.approx(math.log(1.5))  # p = (1/2, 0, 1/2), q = 1/3 each


def test_perplexity_against_the_definition():
    g = torch.Generator().manual_seed(3)
    logits, targets = torch.randn(200, 30, generator=g), torch.randint(0, 30, (200,), generator=g)
    log_probs = logits.double() - torch.logsumexp(logits.double(), dim=-1, keepdim=True)
    nll = -log_probs[torch.arange(200), targets]
    assert token_nll(logits, targets).tolist() == pytest.approx(nll.tolist(), rel=1e-12)
    assert perplexity_from_logits(logits, targets) == pytest.approx(math.exp(float(nll.mean())), rel=1e-12)


def test_totals_over_windows_shift_by_one_and_merge():
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(0, 20, (2, 9), generator=g)
    cand, dense = torch.randn(2, 9, 20, generator=g), torch.randn(2, 9, 20, generator=g)
    ppl = FitnessTotal("ppl").add_window(cand[0], ids[0]).add_window(cand[1], ids[1])
    assert ppl.tokens == 16
    assert ppl.value == pytest.approx(perplexity_from_logits(cand[:, :-1], ids[:, 1:]), rel=1e-12)
    kl_a = FitnessTotal("kl").add_window(cand[0], ids[0], dense[0])
    kl_b = FitnessTotal("kl").add_window(cand[1], ids[1], dense[1])
    assert kl_a.merge(kl_b).value == pytest.approx(kl_divergence(dense[:, :-1], cand[:, :-1]), rel=1e-12)
    part = FitnessTotal("kl").add_window(cand[0], ids[0], dense[0], tokens=3)  # a budget ending inside a window
    assert part.tokens == 3 and part.value == pytest.approx(kl_divergence(dense[0, :3], cand[0, :3]))
    with pytest.raises(ValueError, match="dense model's logits"):
        FitnessTotal("kl").add_window(cand[0], ids[0])
    with pytest.raises(ValueError, match="cannot merge"):
        ppl.merge(kl_a)
    with pytest.raises(ValueError, match="no tokens"):
        _ = FitnessTotal("kl").value
