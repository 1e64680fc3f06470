"""Fixed-mask fine-tuning: W * mask forward, gradient only on kept weights, pruned weights never move."""

import torch
from torch import nn
from torch.nn.utils import parametrize

from compressor.methods.sparse_training import FixedMask
from compressor.sparsity import NM, nm_mask_from_scores


def test_forward_and_gradient_against_the_dense_masked_reference():
    torch.manual_seed(0)
    linear = nn.Linear(8, 4, bias=False)
    w0 = linear.weight.detach().clone()
    mask = nm_mask_from_scores(torch.rand(4, 8), NM(2, 4))
    x, target = torch.randn(3, 8), torch.randn(3, 4)
    w_tilde = (w0 * mask).requires_grad_(True)
    ((x @ w_tilde.T - target) ** 2).sum().backward()

    parametrize.register_parametrization(linear, "weight", FixedMask(mask))
    out = linear(x)
    assert torch.allclose(out, x @ (w0 * mask).T)
    ((out - target) ** 2).sum().backward()
    grad = linear.parametrizations.weight.original.grad
    assert torch.allclose(grad, w_tilde.grad * mask)
    assert torch.all(grad[~mask] == 0)


def test_adamw_leaves_pruned_weights_where_they_are():
    torch.manual_seed(1)
    linear = nn.Linear(8, 4, bias=False)
    mask = nm_mask_from_scores(torch.rand(4, 8), NM(2, 4))
    parametrize.register_parametrization(linear, "weight", FixedMask(mask))
    original = linear.parametrizations.weight.original
    before = original.detach().clone()
    opt = torch.optim.AdamW([original], lr=0.1, weight_decay=0.0)
    for _ in range(3):
        linear(torch.randn(5, 8)).pow(2).sum().backward()
        opt.step()
        opt.zero_grad()
    assert torch.equal(original.detach()[~mask], before[~mask])
    assert not torch.equal(original.detach()[mask], before[mask])
