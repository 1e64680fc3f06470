"""The NaN / inf check of loaded weights: every chunk is looked at, and the error names the tensor."""

import pytest
import torch
from torch import nn

import compressor.models.checks as checks
from compressor.errors import NonFiniteError


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("where", [0, 999, 1000, 4999])
def test_a_bad_value_in_any_chunk_is_found(monkeypatch, bad, where):
    monkeypatch.setattr(checks, "FINITE_CHECK_CHUNK", 1000)
    t = torch.randn(50, 100)
    assert checks.all_finite(t)
    t.view(-1)[where] = bad
    assert not checks.all_finite(t)


def test_the_error_names_the_weight(monkeypatch):
    monkeypatch.setattr(checks, "FINITE_CHECK_CHUNK", 7)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 8))
    checks.assert_finite_weights(model)
    with torch.no_grad():
        model[1].weight[7, 3] = float("nan")
    with pytest.raises(NonFiniteError, match=r"weight 1\.weight holds 1 NaN/inf"):
        checks.assert_finite_weights(model)
