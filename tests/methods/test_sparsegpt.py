"""SparseGPT against a deliberately naive OBS re-derivation with explicit inverses."""

import pytest
import torch

from compressor.errors import NonFiniteError, SparsityPatternError
from compressor.methods.magnitude import magnitude_mask
from compressor.methods.objective import output_energy
from compressor.methods.sparsegpt import sparsegpt
from compressor.methods.wanda import wanda_mask
from compressor.sparsity import NM, Unstructured, is_nm


def correlated_problem(rows=6, cols=16, tokens=400, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=g) / cols**0.5 + torch.eye(cols)
    x = torch.randn(tokens, cols, generator=g) @ mix * (torch.rand(cols, generator=g) * 3 + 0.1)
    w = torch.randn(rows, cols, generator=g)
    return w, (x.T @ x).double()


def naive_obs(w, gram, sparsity, damp, block_size):
    """Column by column: choose the mask like SparseGPT, then the textbook OBS update with the
    inverse of the remaining columns' Hessian computed from scratch each time."""
    w = w.double().clone()
    h = gram.clone()
    h += damp * torch.diagonal(h).mean() * torch.eye(h.shape[0], dtype=h.dtype)
    cols = w.shape[1]
    pruned = torch.zeros_like(w, dtype=torch.bool)
    hinv_diag = torch.stack([torch.linalg.inv(h[j:, j:])[0, 0] for j in range(cols)])  # [H_F^-1]_jj, F = j..
    for j in range(cols):
        if isinstance(sparsity, NM) and j % sparsity.m == 0:
            s = w[:, j : j + sparsity.m] ** 2 / hinv_diag[j : j + sparsity.m]
            drop = s.topk(sparsity.m - sparsity.n, dim=1, largest=False).indices
            pruned[:, j : j + sparsity.m].scatter_(1, drop, True)
        if not isinstance(sparsity, NM) and j % block_size == 0:
            b1 = min(j + block_size, cols)
            s = w[:, j:b1] ** 2 / hinv_diag[j:b1]
            k = int(s.numel() * sparsity.sparsity)
            flat = torch.zeros(s.numel(), dtype=torch.bool)
            flat[s.reshape(-1).topk(k, largest=False).indices] = True
            pruned[:, j:b1] = flat.reshape(s.shape)
        hinv = torch.linalg.inv(h[j:, j:])
        err = torch.where(pruned[:, j], w[:, j], torch.zeros_like(w[:, j])) / hinv[0, 0]
        w[:, j:] -= err.unsqueeze(1) * hinv[0].unsqueeze(0)
    w[pruned] = 0
    return ~pruned, w


@pytest.mark.parametrize("sparsity", [NM(2, 4), NM(1, 4), NM(2, 8), Unstructured(0.5)], ids=str)
@pytest.mark.parametrize("block_size", [8, 64])
def test_matches_the_naive_obs_derivation(sparsity, block_size):
    w, gram = correlated_problem()
    res = sparsegpt(w, gram, sparsity, damp=0.01, block_size=block_size)
    ref_mask, ref_w = naive_obs(w, gram, sparsity, 0.01, block_size)
    assert torch.equal(res.mask, ref_mask)
    torch.testing.assert_close(res.weight.double(), ref_w, rtol=1e-4, atol=1e-4)
    if isinstance(sparsity, NM):
        assert is_nm(res.weight, sparsity)


def test_much_lower_error_than_magnitude_and_wanda():
    w, gram = correlated_problem(rows=32, cols=64, tokens=2000)
    res = sparsegpt(w, gram, NM(2, 4))
    loss = lambda wp: float(output_energy(w - wp, gram).sum())  # noqa: E731
    assert loss(res.weight) < 0.8 * loss(w * wanda_mask(w, torch.diagonal(gram), NM(2, 4)))
    assert loss(res.weight) < 0.8 * loss(w * magnitude_mask(w, NM(2, 4)))


def test_scale_invariance_dead_inputs_and_mask_only():
    w, gram = correlated_problem()
    a = sparsegpt(w, gram, NM(2, 4))
    b = sparsegpt(w, gram * 1000.0, NM(2, 4))
    assert torch.equal(a.mask, b.mask)
    torch.testing.assert_close(a.weight, b.weight, rtol=1e-4, atol=1e-5)

    gram_dead = gram.clone()
    gram_dead[3, :] = 0
    gram_dead[:, 3] = 0
    dead = sparsegpt(w, gram_dead, NM(2, 4))
    assert not dead.mask[:, 3].any()  # a dead input is pruned everywhere
    assert torch.isfinite(dead.weight).all()

    frozen = sparsegpt(w, gram, NM(2, 4), update_weights=False)
    assert torch.equal(frozen.mask, a.mask)
    torch.testing.assert_close(frozen.weight, w * a.mask)


def test_bad_inputs():
    w, gram = correlated_problem()
    with pytest.raises(SparsityPatternError, match="multiple of M"):
        sparsegpt(w, gram, NM(2, 8), block_size=12)
    with pytest.raises(SparsityPatternError):
        sparsegpt(w[:, :14], gram[:14, :14], NM(2, 4))
    bad = w.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="weight"):
        sparsegpt(bad, gram, NM(2, 4))
    with pytest.raises(ValueError, match="does not match"):
        sparsegpt(w, gram[:8, :8], NM(2, 4))
