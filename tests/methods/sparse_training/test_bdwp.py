"""BDWP's autograd function against its definition: the forward uses W masked N:M along the input, dX
equals dY times W masked N:M along the output, dW equals the dense gradient dY^T X."""

import itertools

import torch
import torch.nn.functional as F
from torch import nn

from compressor.methods.sparse_training import BDWPLinear, bdwp_linear, bdwp_masks
from compressor.sparsity import NM, is_nm


def _brute_output_mask(w: torch.Tensor, nm: NM) -> torch.Tensor:
    """Groups of M consecutive output rows in each column keep their N largest |w|."""
    mask = torch.zeros_like(w, dtype=torch.bool)
    for c, g in itertools.product(range(w.shape[1]), range(w.shape[0] // nm.m)):
        rows = range(g * nm.m, (g + 1) * nm.m)
        for r in sorted(rows, key=lambda r: -abs(float(w[r, c])))[: nm.n]:
            mask[r, c] = True
    return mask


def test_masks_run_along_the_input_and_the_output_dimension():
    nm = NM(2, 4)
    w = torch.randn(8, 12, generator=torch.Generator().manual_seed(0))
    m_in, m_out = bdwp_masks(w, nm)
    assert is_nm(m_in, nm) and is_nm(m_out.T, nm)
    assert torch.equal(m_out, _brute_output_mask(w, nm))


def test_forward_input_and_weight_gradients_match_their_definition():
    nm = NM(2, 4)
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(8, 12, generator=gen).requires_grad_(True)
    b = torch.randn(8, generator=gen).requires_grad_(True)
    x = torch.randn(2, 5, 12, generator=gen).requires_grad_(True)  # (B, T, in)
    dy = torch.randn(2, 5, 8, generator=gen)
    m_in, m_out = bdwp_masks(w, nm)

    y = bdwp_linear(x, w, b, m_in, m_out)
    assert torch.allclose(y, x @ (w.detach() * m_in).T + b.detach(), atol=1e-6)
    y.backward(dy)
    assert torch.allclose(x.grad, dy @ (w.detach() * m_out), atol=1e-5)
    # the dense gradient: that of F.linear with respect to its (masked) weight, passed to W unchanged
    w_tilde = (w.detach() * m_in).requires_grad_(True)
    F.linear(x.detach(), w_tilde, b.detach()).backward(dy)
    assert torch.allclose(w.grad, w_tilde.grad, atol=1e-5)
    assert torch.allclose(w.grad, dy.reshape(-1, 8).T @ x.detach().reshape(-1, 12), atol=1e-5)
    assert torch.allclose(b.grad, dy.sum(dim=(0, 1)))


def test_under_bf16_autocast_the_products_run_in_bf16_and_the_gradients_keep_their_dtypes():
    # backward runs outside the autocast region: its products must take the forward's dtype themselves
    nm = NM(2, 4)
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(8, 12, generator=gen).requires_grad_(True)
    x = torch.randn(2, 5, 12, generator=gen).requires_grad_(True)
    dy = torch.randn(2, 5, 8, generator=gen)
    m_in, m_out = bdwp_masks(w, nm)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = bdwp_linear(x, w, None, m_in, m_out)
    assert y.dtype == torch.bfloat16
    y.backward(dy.to(torch.bfloat16))
    assert x.grad.dtype == w.grad.dtype == torch.float32
    bf = torch.bfloat16
    assert torch.equal(x.grad, (dy.to(bf) @ (w.detach() * m_out).to(bf)).float())
    assert torch.equal(w.grad, (dy.to(bf).reshape(-1, 8).T @ x.detach().to(bf).reshape(-1, 12)).float())
    exact = dy @ (w.detach() * m_out)
    assert torch.allclose(x.grad, exact, rtol=0.05, atol=0.05)  # bf16's rounding of the float32 gradient


def test_swap_is_reversible_and_bakes_the_forward_mask():
    nm = NM(2, 4)
    torch.manual_seed(2)
    linear = nn.Linear(8, 4)
    dense = linear.weight.detach().clone()
    swapped = BDWPLinear.from_linear(linear, nm, "l")
    assert swapped.weight is linear.weight and swapped.bias is linear.bias
    x = torch.randn(3, 8)
    swapped.train(False)
    m_in, _ = bdwp_masks(dense, nm)
    assert torch.allclose(swapped(x), F.linear(x, dense * m_in, linear.bias))
    back = swapped.to_linear(bake=True)
    assert isinstance(back, nn.Linear) and torch.equal(back.weight.detach(), dense * m_in)
    assert is_nm(back.weight, nm)


def test_masks_are_regenerated_when_the_weights_change():
    swapped = BDWPLinear(nn.Parameter(torch.tensor([[4.0, 3.0, 2.0, 1.0]] * 4)), None, NM(2, 4))
    first = swapped.masks()[0].clone()
    with torch.no_grad():
        swapped.weight.copy_(torch.tensor([[1.0, 2.0, 3.0, 4.0]] * 4))
    assert torch.equal(swapped.masks()[0], first)  # within a step the cached masks serve every micro-batch
    swapped.weights_changed()
    assert torch.equal(swapped.masks()[0], ~first)
