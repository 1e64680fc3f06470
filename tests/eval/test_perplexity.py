import math

import pytest
import torch

from compressor.eval import perplexity
from compressor.models import load_model


def test_perplexity_equals_the_models_own_loss(tiny_llama_dir):
    model = load_model(str(tiny_llama_dir)).model
    windows = torch.randint(0, 49152, (5, 40), generator=torch.Generator().manual_seed(0))
    result = perplexity(model, windows, batch_size=2)
    with torch.no_grad():
        # HF averages over the 39 predicted tokens of each window; all windows have equal length.
        losses = [model(w[None], labels=w[None]).loss.item() for w in windows]
    assert result.nll == pytest.approx(sum(losses) / len(losses), rel=1e-5)
    assert result.perplexity == pytest.approx(math.exp(result.nll))
    assert (result.windows, result.window_length, result.tokens) == (5, 40, 5 * 39)


def test_perplexity_rejects_empty_windows(tiny_llama_dir):
    model = load_model(str(tiny_llama_dir)).model
    with pytest.raises(ValueError, match="non-empty"):
        perplexity(model, torch.empty(0, 8, dtype=torch.long))


def test_perplexity_standard_error_comes_from_the_spread_over_windows(tiny_llama_dir):
    model = load_model(str(tiny_llama_dir)).model
    windows = torch.randint(0, 49152, (4, 16), generator=torch.Generator().manual_seed(1))
    result = perplexity(model, windows, batch_size=3)
    with torch.no_grad():
        losses = torch.tensor([model(w[None], labels=w[None]).loss.item() for w in windows], dtype=torch.float64)
    assert result.nll_stderr == pytest.approx((losses.std() / 2).item(), rel=1e-4)
    assert result.as_dict()["stderr"] == pytest.approx(result.perplexity * result.nll_stderr)
    assert perplexity(model, windows[:1]).stderr is None
