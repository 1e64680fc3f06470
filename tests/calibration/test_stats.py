import pytest
import torch

from compressor.calibration.stats import InputStats
from compressor.errors import NonFiniteError


def test_gram_streams_to_the_float64_product():
    torch.manual_seed(0)
    x = torch.randn(3, 50, 16)
    stats = InputStats.empty("gram", 16)
    for batch in x:  # three batches of (50, 16)
        stats.add(batch)
    flat = x.reshape(-1, 16).double()
    assert stats.tokens == 150
    assert stats.gram.dtype == torch.float64
    # Each batch's product is formed in float32 (fast BLAS), so agreement is to float32 precision.
    torch.testing.assert_close(stats.gram, flat.T @ flat, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stats.norms_sq, (flat**2).sum(0), rtol=1e-6, atol=1e-6)


def test_norms_only_and_none():
    x = torch.randn(2, 7, 8)
    norms = InputStats.empty("norms", 8)
    norms.add(x)
    assert norms.gram is None
    torch.testing.assert_close(norms.norms_sq, (x.double() ** 2).sum((0, 1)), rtol=1e-6, atol=1e-6)
    nothing = InputStats.empty("none", 8)
    nothing.add(x)
    assert nothing.tokens == 0
    with pytest.raises(ValueError):
        nothing.norms_sq


def test_half_precision_inputs_are_accumulated_in_float32_or_better():
    x = torch.full((4, 300, 4), 60.0, dtype=torch.float16)  # 1200 * 3600 overflows float16
    stats = InputStats.empty("gram", 4)
    stats.add(x)
    assert torch.isfinite(stats.gram).all()
    assert stats.gram[0, 0].item() == pytest.approx(1200 * 3600)


def test_bad_inputs():
    stats = InputStats.empty("gram", 4)
    with pytest.raises(ValueError, match="width 4"):
        stats.add(torch.randn(3, 5))
    with pytest.raises(NonFiniteError, match="non-finite"):
        stats.add(torch.tensor([[1.0, float("nan"), 0.0, 0.0]]))
