import itertools

import pytest
import torch

from compressor.methods.magnitude import magnitude_mask
from compressor.methods.objective import output_energy, reconstruction_error
from compressor.methods.wanda import wanda_mask
from compressor.sparsity import NM, Unstructured, is_nm


def test_magnitude_nm_keeps_the_largest_of_each_group():
    w = torch.tensor([[0.1, -3.0, 2.0, 0.5, 7.0, -8.0, 0.0, 1.0]])
    mask = magnitude_mask(w, NM(2, 4))
    assert mask.tolist() == [[False, True, True, False, True, True, False, False]]


def test_magnitude_unstructured_is_layer_wide():
    w = torch.tensor([[1.0, 2.0], [30.0, 40.0]])
    assert magnitude_mask(w, Unstructured(0.5)).tolist() == [[False, False], [True, True]]


def test_wanda_weights_columns_by_input_norm():
    # Column 0 has small weights but a huge input norm: Wanda keeps it, magnitude does not.
    w = torch.tensor([[0.1, 1.0, 1.0, 1.0]])
    norms_sq = torch.tensor([1e4, 1.0, 1.0, 1.0])
    assert wanda_mask(w, norms_sq, NM(1, 4)).tolist() == [[True, False, False, False]]
    assert magnitude_mask(w, NM(1, 4))[0, 0].item() is False


def test_wanda_unstructured_compares_within_rows():
    w = torch.tensor([[1.0, 2.0, 3.0, 4.0], [100.0, 200.0, 300.0, 400.0]])
    mask = wanda_mask(w, torch.ones(4), Unstructured(0.5))
    assert mask.sum(1).tolist() == [2, 2]


@pytest.mark.parametrize("nm", [NM(2, 4), NM(1, 4), NM(4, 8)])
def test_wanda_is_optimal_for_a_diagonal_gram(nm):
    """With uncorrelated inputs the output error separates per weight, and Wanda's mask is exact."""
    torch.manual_seed(0)
    w = torch.randn(3, 8)
    norms_sq = torch.rand(8) * 10
    gram = torch.diag(norms_sq).double()
    mask = wanda_mask(w, norms_sq, nm)
    assert is_nm(mask, nm)
    best = float("inf")
    group_choices = [c for c in itertools.combinations(range(nm.m), nm.n)]
    for row in range(3):
        row_best = min(
            float(output_energy((w[row : row + 1] * (1 - _mask_from(choice, nm))), gram).sum())
            for choice in itertools.product(group_choices, repeat=8 // nm.m)
        )
        got = float(output_energy(w[row : row + 1] * (~mask[row : row + 1]), gram).sum())
        assert got == pytest.approx(row_best, rel=1e-9)


def _mask_from(choice, nm):
    m = torch.zeros(1, len(choice) * nm.m)
    for g, keep in enumerate(choice):
        for k in keep:
            m[0, g * nm.m + k] = 1
    return m


def test_reconstruction_error_matches_the_definition():
    torch.manual_seed(0)
    x = torch.randn(200, 16)
    w = torch.randn(8, 16)
    wp = w * magnitude_mask(w, NM(2, 4))
    direct = ((w - wp) @ x.T).double().pow(2).sum() / (w @ x.T).double().pow(2).sum()
    gram = (x.T @ x).double()
    assert reconstruction_error(w, wp, gram) == pytest.approx(float(direct), rel=1e-6)
    assert reconstruction_error(w, w, gram) == 0.0
    assert reconstruction_error(w, wp, torch.zeros(16, 16, dtype=torch.float64)) == 0.0
