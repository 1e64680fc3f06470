"""SR-STE against a dense reference: the mask is the brute-force top-N |w|, the forward uses W * m, the
gradient is the dense gradient at W * m plus lambda_w (1 - m) W, and one SGD step is the paper's update."""

import itertools

import torch
from torch import nn
from torch.nn.utils import parametrize

from compressor.methods.sparse_training import SRSTEWeight, sparse_refined_penalty
from compressor.sparsity import NM, is_nm


def _brute_topn(w: torch.Tensor, nm: NM) -> torch.Tensor:
    mask = torch.zeros_like(w, dtype=torch.bool)
    for r, g in itertools.product(range(w.shape[0]), range(w.shape[1] // nm.m)):
        cols = range(g * nm.m, (g + 1) * nm.m)
        for c in sorted(cols, key=lambda c: -abs(float(w[r, c])))[: nm.n]:
            mask[r, c] = True
    return mask


def _layer(seed=0, out=6, inp=8):
    torch.manual_seed(seed)
    linear = nn.Linear(inp, out, bias=False)
    x = torch.randn(5, inp)
    target = torch.randn(5, out)
    return linear, x, target


def test_mask_is_the_magnitude_top_n_of_each_group():
    w = torch.randn(6, 16)
    rule = SRSTEWeight(NM(2, 4), (6, 16))
    assert torch.equal(rule.hard_mask(w), _brute_topn(w, NM(2, 4)))
    assert is_nm(rule.hard_mask(w), NM(2, 4))


def test_gradient_is_straight_through_plus_the_sparse_refined_term():
    nm, lam = NM(2, 4), 0.3
    linear, x, target = _layer()
    w0 = linear.weight.detach().clone()
    mask = _brute_topn(w0, nm)

    # dense reference: the loss at W~ = W * m, differentiated with respect to W~ itself
    w_tilde = (w0 * mask).requires_grad_(True)
    ((x @ w_tilde.T - target) ** 2).mean().backward()
    expected = w_tilde.grad + lam * (~mask).float() * w0

    rule = SRSTEWeight(nm, tuple(w0.shape))
    rule.track_penalty = True
    parametrize.register_parametrization(linear, "weight", rule)
    rule.train(True)
    out = linear(x)
    assert torch.allclose(out, x @ (w0 * mask).T)
    loss = ((out - target) ** 2).mean() + lam * rule.penalty
    loss.backward()
    assert torch.allclose(linear.parametrizations.weight.original.grad, expected, atol=1e-6)


def test_one_sgd_step_is_the_sr_ste_update():
    nm, lam, lr = NM(2, 4), 2e-2, 0.1
    linear, x, target = _layer(seed=1)
    w0 = linear.weight.detach().clone()
    mask = _brute_topn(w0, nm)
    w_tilde = (w0 * mask).requires_grad_(True)
    ((x @ w_tilde.T - target) ** 2).mean().backward()
    updated = w0 - lr * (w_tilde.grad + lam * (1 - mask.float()) * w0)  # Zhou et al. 2021, eq. 5

    rule = SRSTEWeight(nm, tuple(w0.shape))
    rule.track_penalty = True
    parametrize.register_parametrization(linear, "weight", rule)
    rule.train(True)
    original = linear.parametrizations.weight.original
    opt = torch.optim.SGD([original], lr=lr)
    (((linear(x) - target) ** 2).mean() + lam * rule.penalty).backward()
    opt.step()
    assert torch.allclose(original.detach(), updated, atol=1e-7)


def test_mask_follows_the_weights_after_they_change():
    rule = SRSTEWeight(NM(2, 4), (1, 4))
    w = torch.tensor([[4.0, 3.0, 2.0, 1.0]])
    rule.train(True)
    assert rule(w).tolist() == [[4.0, 3.0, 0.0, 0.0]]
    w2 = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    assert rule(w2).tolist() == [[1.0, 2.0, 0.0, 0.0]]  # cached within a step: the weights do not move there
    rule.weights_changed()
    assert rule(w2).tolist() == [[0.0, 0.0, 3.0, 4.0]]


def test_penalty_gradient_is_the_pruned_weights():
    w = torch.randn(4, 8, requires_grad=True)
    mask = _brute_topn(w.detach(), NM(2, 4))
    sparse_refined_penalty(w, mask).backward()
    assert torch.equal(w.grad, w.detach() * (~mask).float())
