"""Perplexity over fixed windows, as BENCHMARK.md defines it: exp(mean next-token NLL over all windows).

The LM head is applied one window at a time: (B, T, vocab) float32 logits for a 49k vocabulary would
otherwise cost ~0.8 GB per batch of 8 x 512.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from compressor.errors import NonFiniteError


@dataclass
class PerplexityResult:
    perplexity: float
    nll: float  # mean next-token negative log-likelihood (nats)
    windows: int
    window_length: int
    tokens: int  # predicted tokens
    note: Optional[str] = None  # e.g. "quick variant: first 64 windows"
    nll_stderr: Optional[float] = None  # standard error of the mean NLL, from the spread over windows

    @property
    def stderr(self) -> Optional[float]:
        """Standard error of the perplexity (delta method: d exp(x) = exp(x) dx)."""
        return None if self.nll_stderr is None else self.perplexity * self.nll_stderr

    def as_dict(self) -> dict:
        return {**asdict(self), "stderr": self.stderr}


@torch.no_grad()
def perplexity(
    model: nn.Module, windows: torch.Tensor, batch_size: int = 4, desc: str = "perplexity", note: Optional[str] = None
) -> PerplexityResult:
    """``model`` is a transformers causal LM; ``windows`` is (W, T) token ids."""
    if windows.ndim != 2 or windows.shape[0] == 0:
        raise ValueError(f"windows must be a non-empty (W, T) tensor, got shape {tuple(windows.shape)}")
    base, head = model.get_decoder(), model.get_output_embeddings()
    device = next(model.parameters()).device
    total_nll = torch.zeros((), dtype=torch.float64)
    window_nll: list[float] = []  # mean NLL of each window (all windows have the same length)
    count = 0
    bar = tqdm(total=windows.shape[0], desc=desc, unit="window")
    for start in range(0, windows.shape[0], batch_size):
        ids = windows[start : start + batch_size].to(device)  # (B, T)
        hidden = base(input_ids=ids, use_cache=False).last_hidden_state  # (B, T, H)
        for b in range(ids.shape[0]):
            logits = head(hidden[b, :-1]).float()  # (T-1, vocab)
            nll = F.cross_entropy(logits, ids[b, 1:], reduction="sum").double().cpu()
            total_nll += nll
            window_nll.append(nll.item() / (ids.shape[1] - 1))
            count += ids.shape[1] - 1
        bar.update(ids.shape[0])
        bar.set_postfix(ppl=f"{math.exp(total_nll.item() / count):.2f}")
    bar.close()
    nll = total_nll.item() / count
    if not math.isfinite(nll):
        raise NonFiniteError("the model produced non-finite log-likelihoods; check its weights for NaN/inf")
    return PerplexityResult(math.exp(nll), nll, windows.shape[0], windows.shape[1], count, note, mean_stderr(window_nll))


def mean_stderr(values: list[float]) -> Optional[float]:
    """Sample standard deviation / sqrt(n); None for fewer than two values."""
    n = len(values)
    if n < 2:
        return None
    mean = sum(values) / n
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)
