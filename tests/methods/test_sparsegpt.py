"""SparseGPT against a deliberately naive OBS re-derivation with explicit inverses."""

import logging

import pytest
import torch

from compressor.errors import DataError, NonFiniteError, SparsityPatternError
from compressor.methods.magnitude import magnitude_mask
from compressor.methods.objective import output_energy
from compressor.methods.sparsegpt import cholesky_, inverse_hessian_factor, lower_triangular_inverse_, sparsegpt
from compressor.methods.wanda import wanda_mask
from compressor.sparsity import NM, Unstructured, group_view, is_nm


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny problems: thread hand-offs cost more than the arithmetic (and the machine is shared)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def correlated_inputs(cols, tokens, seed):
    """(tokens, cols) float64 inputs with strongly correlated, unevenly scaled channels: a few latent
    factors shared by all channels plus channel noise (as in LLM activations)."""
    g = torch.Generator().manual_seed(seed)
    rank = max(2, cols // 8)
    x = torch.randn(tokens, rank, generator=g) @ torch.randn(rank, cols, generator=g)
    x += 0.3 * torch.randn(tokens, cols, generator=g)
    return (x * (torch.rand(cols, generator=g) * 3 + 0.1)).double()


def correlated_problem(rows=6, cols=16, tokens=400, seed=0):
    """(weight float32 (rows, cols), Gram float64 (cols, cols))."""
    x = correlated_inputs(cols, tokens, seed)
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed + 100))
    return w, x.T @ x


def naive_obs(w, gram, sparsity, damp, block_size):
    """Column by column, in float64: choose the mask like SparseGPT, then the textbook OBS update,
    with the inverse of the remaining columns' (damped) Hessian computed from scratch every time."""
    w = w.double().clone()
    h = gram.clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0
    h += damp * torch.diagonal(h).mean() * torch.eye(h.shape[0], dtype=h.dtype)
    cols = w.shape[1]
    pruned = torch.zeros_like(w, dtype=torch.bool)
    # [H_F^-1]_jj for F = j.. (the columns not yet visited): the OBS saliency denominator of column j
    hinv_diag = torch.stack([torch.linalg.inv(h[j:, j:])[0, 0] for j in range(cols)])
    for j in range(cols):
        if isinstance(sparsity, NM) and j % sparsity.m == 0:
            s = w[:, j : j + sparsity.m] ** 2 / hinv_diag[j : j + sparsity.m]
            drop = s.topk(sparsity.m - sparsity.n, dim=1, largest=False).indices
            pruned[:, j : j + sparsity.m].scatter_(1, drop, True)
        if isinstance(sparsity, Unstructured) and j % block_size == 0:
            b1 = min(j + block_size, cols)
            s = w[:, j:b1] ** 2 / hinv_diag[j:b1]
            flat = torch.zeros(s.numel(), dtype=torch.bool)
            flat[s.reshape(-1).topk(int(s.numel() * sparsity.sparsity), largest=False).indices] = True
            pruned[:, j:b1] = flat.reshape(s.shape)
        hinv = torch.linalg.inv(h[j:, j:])
        err = torch.where(pruned[:, j], w[:, j], torch.zeros_like(w[:, j])) / hinv[0, 0]
        w[:, j:] -= err.unsqueeze(1) * hinv[0].unsqueeze(0)  # OBS: the remaining columns absorb the error
    w[pruned] = 0
    return ~pruned, w


@pytest.mark.parametrize(
    "sparsity, block_size",
    [(NM(2, 4), 8), (NM(2, 4), 64), (NM(2, 4), 10), (NM(1, 4), 8), (NM(2, 8), 16), (NM(2, 8), 64),
     (Unstructured(0.5), 8), (Unstructured(0.5), 20), (Unstructured(0.5), 64), (Unstructured(0.7), 12)],
    ids=str,
)
def test_matches_the_naive_obs_derivation(sparsity, block_size):
    w, gram = correlated_problem(rows=6, cols=48)
    res = sparsegpt(w, gram, sparsity, damp=0.01, block_size=block_size)
    ref_mask, ref_w = naive_obs(w, gram, sparsity, 0.01, block_size)
    assert torch.equal(res.mask, ref_mask)
    assert res.weight.dtype == w.dtype
    torch.testing.assert_close(res.weight.double(), ref_w, rtol=1e-4, atol=1e-4)
    assert torch.equal(res.weight != 0, res.mask)
    if isinstance(sparsity, NM):
        assert is_nm(res.weight, sparsity)
        assert (group_view(res.mask, sparsity.m).sum(-1) == sparsity.n).all()  # exactly N kept per group
    else:
        assert 1 - res.mask.double().mean() == pytest.approx(sparsity.sparsity, abs=1 / 48)


def test_dead_inputs_match_the_naive_derivation_and_are_pruned():
    w, gram = correlated_problem(rows=6, cols=24)
    for dead in (3, 10, 17):
        gram[dead, :] = 0
        gram[:, dead] = 0
    res = sparsegpt(w, gram, NM(2, 4), block_size=8)
    ref_mask, ref_w = naive_obs(w, gram, NM(2, 4), 0.01, 8)
    assert torch.equal(res.mask, ref_mask)
    torch.testing.assert_close(res.weight.double(), ref_w, rtol=1e-4, atol=1e-4)
    assert not res.mask[:, [3, 10, 17]].any()  # a dead input's weight has score 0: pruned in every row
    assert torch.isfinite(res.weight).all()

    silent = sparsegpt(w, torch.zeros_like(gram), NM(2, 4))  # the layer never saw an input
    assert is_nm(silent.mask, NM(2, 4)) and not silent.weight.any()


def test_much_lower_error_than_magnitude_and_wanda():
    w, gram = correlated_problem(rows=32, cols=64, tokens=2000)
    loss = lambda wp: float(output_energy(w - wp, gram).sum())  # noqa: E731
    for target in (NM(2, 4), Unstructured(0.5)):
        res = sparsegpt(w, gram, target)
        assert loss(res.weight) < 0.5 * loss(w * wanda_mask(w, torch.diagonal(gram), target))
        assert loss(res.weight) < 0.5 * loss(w * magnitude_mask(w, target))


def test_invariant_to_the_scale_of_the_gram_matrix():
    w, gram = correlated_problem(rows=8, cols=32)
    a = sparsegpt(w, gram, NM(2, 4))
    for scale in (1e3, 1.0 / 65536):
        b = sparsegpt(w, gram * scale, NM(2, 4))
        assert torch.equal(a.mask, b.mask)
        torch.testing.assert_close(a.weight, b.weight, rtol=1e-4, atol=1e-5)


def test_mask_only_keeps_the_original_weights():
    w, gram = correlated_problem(rows=8, cols=32)
    updated = sparsegpt(w, gram, NM(2, 4))
    frozen = sparsegpt(w, gram, NM(2, 4), update_weights=False)
    assert torch.equal(frozen.mask, updated.mask)
    assert torch.equal(frozen.weight, w * updated.mask)
    assert not torch.equal(updated.weight, frozen.weight)


def test_half_precision_weights_keep_their_dtype():
    w, gram = correlated_problem(rows=8, cols=32)
    res = sparsegpt(w.to(torch.bfloat16), gram, NM(2, 4))
    assert res.weight.dtype == torch.bfloat16 and is_nm(res.weight, NM(2, 4))


def test_factor_is_the_upper_cholesky_factor_of_the_damped_inverse():
    _, gram = correlated_problem(cols=16)
    u, dead = inverse_hessian_factor(gram, 0.01)
    h = gram + 0.01 * torch.diagonal(gram).mean() * torch.eye(16, dtype=gram.dtype)
    assert not dead.any()
    assert torch.equal(u, u.triu()) and (torch.diagonal(u) > 0).all()
    torch.testing.assert_close(u.T @ u, torch.linalg.inv(h), rtol=1e-9, atol=1e-12)


def test_blockwise_triangular_inverse():
    x = correlated_inputs(37, 200, seed=6)
    lower = torch.linalg.cholesky(x.T @ x)
    inv = lower_triangular_inverse_(lower.clone(), leaf=4)  # recurses over uneven halves
    assert torch.equal(inv, inv.tril())
    torch.testing.assert_close(inv @ lower, torch.eye(37, dtype=torch.float64), rtol=0, atol=1e-9)


def test_indefinite_hessian_is_retried_with_more_damping_and_logged(caplog):
    x = correlated_inputs(16, 8, seed=5)  # 8 tokens: rank 8 of 16
    gram = x.T @ x - 1e-3 * torch.diagonal(x.T @ x).mean() * torch.eye(16, dtype=torch.float64)
    logger = logging.getLogger("compressor.methods.sparsegpt")
    logger.addHandler(caplog.handler)
    try:
        res = sparsegpt(torch.randn(4, 16), gram, NM(2, 4), damp=0.0)
    finally:
        logger.removeHandler(caplog.handler)
    assert torch.isfinite(res.weight).all() and is_nm(res.weight, NM(2, 4))
    assert any("damp" in r.getMessage() for r in caplog.records)


def test_bad_inputs_are_named():
    w, gram = correlated_problem()
    with pytest.raises(SparsityPatternError, match="not divisible by M=4"):
        sparsegpt(w[:, :14], gram[:14, :14], NM(2, 4))
    bad = w.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="weight"):
        sparsegpt(bad, gram, NM(2, 4))
    bad_gram = gram.clone()
    bad_gram[2, 3] = float("inf")
    with pytest.raises(NonFiniteError, match="Gram"):
        sparsegpt(w, bad_gram, NM(2, 4))
    with pytest.raises(ValueError, match="does not match"):
        sparsegpt(w, gram[:8, :8], NM(2, 4))
    with pytest.raises(DataError, match="positive semi-definite"):
        sparsegpt(w, -gram, NM(2, 4))


def test_the_callers_weight_is_never_written_even_for_a_single_row():
    w, gram = correlated_problem(rows=1, cols=16)
    before = w.clone()
    res = sparsegpt(w, gram, NM(2, 4), update_weights=False)
    assert torch.equal(w, before)
    assert torch.equal(res.weight, before * res.mask)


def test_blockwise_cholesky_in_place_matches_lapack_and_reports_indefinite_matrices():
    x = correlated_inputs(37, 200, seed=7)
    gram = x.T @ x
    lower = gram.clone()
    assert cholesky_(lower, leaf=4)  # uneven halves
    assert torch.equal(lower, lower.tril())
    torch.testing.assert_close(lower, torch.linalg.cholesky(gram), rtol=0, atol=1e-9)
    gram[30, 30] = -1.0  # indefinite only in the second half
    assert not cholesky_(gram.clone(), leaf=4)
