"""Fitness of a candidate from logits (lower is better), the pure part of scoring.

- ``kl`` (default): KL(P_dense || Q_candidate) of the next-token distributions, mean over tokens; as
  EvoPress, the dense model's distribution is the reference.
- ``ppl``: perplexity of the candidate, exp(mean next-token NLL).

Both use the predictions at positions 0 .. T-2 of a window (those that have a next token), so the two
see the same tokens and a stage's token budget means the same for both. Log-softmax (max-subtracted, so
logits of any size are safe) runs in float64 on chunks of rows: two float32 distributions that are close
differ by less than float32 resolves, and a (512, 49152) float64 block would cost 200 MB per copy.
Sums, not means, are what workers return (``FitnessTotal``): totals over windows add up exactly however
the windows were split between Ray tasks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Optional

import torch
import torch.nn.functional as F

FitnessKind = Literal["kl", "ppl"]
_CHUNK = 128  # rows per float64 block


def token_kl(dense_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """(..., V) logits of the dense model and the candidate -> (N,) float64 KL(P_dense || Q) per row."""
    if dense_logits.shape != logits.shape:
        raise ValueError(f"dense logits {tuple(dense_logits.shape)} and candidate logits {tuple(logits.shape)} differ")
    p_all, q_all = dense_logits.reshape(-1, logits.shape[-1]), logits.reshape(-1, logits.shape[-1])
    out = []
    for start in range(0, p_all.shape[0], _CHUNK):
        log_p = F.log_softmax(p_all[start : start + _CHUNK].double(), dim=-1)  # (chunk, V)
        log_q = F.log_softmax(q_all[start : start + _CHUNK].double(), dim=-1)
        terms = torch.where(log_p > -math.inf, log_p.exp() * (log_p - log_q), 0.0)  # 0 log 0 = 0
        out.append(terms.sum(dim=-1))
    return torch.cat(out)


def token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(..., V) logits and (...) target ids -> (N,) float64 negative log-likelihoods."""
    flat, ids = logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)
    return torch.cat([F.cross_entropy(flat[s : s + _CHUNK].double(), ids[s : s + _CHUNK], reduction="none")
                      for s in range(0, flat.shape[0], _CHUNK)])


@dataclass
class FitnessTotal:
    """A running sum over tokens of one fitness kind."""

    kind: FitnessKind
    total: float = 0.0  # sum over tokens of the KL, or of the NLL
    tokens: int = 0

    def add_window(self, logits: torch.Tensor, ids: torch.Tensor, dense_logits: Optional[torch.Tensor] = None,
                   tokens: Optional[int] = None) -> "FitnessTotal":
        """Add one window: ``logits`` (T, V) of the candidate, ``ids`` (T,), and for ``kl`` the dense
        model's (T, V) logits; only the first ``tokens`` predictions count (a stage's budget may end
        inside a window). Returns self."""
        used = ids.shape[0] - 1 if tokens is None else min(tokens, ids.shape[0] - 1)
        if self.kind == "kl":
            if dense_logits is None:
                raise ValueError("the kl fitness needs the dense model's logits")
            values = token_kl(dense_logits[:used], logits[:used])
        else:
            values = token_nll(logits[:used], ids[1 : used + 1])
        self.total += float(values.sum())
        self.tokens += used
        return self

    def merge(self, other: "FitnessTotal") -> "FitnessTotal":
        if other.kind != self.kind:
            raise ValueError(f"cannot merge {self.kind} and {other.kind} totals")
        return FitnessTotal(self.kind, self.total + other.total, self.tokens + other.tokens)

    @property
    def value(self) -> float:
        """Mean KL over tokens, or perplexity."""
        if self.tokens < 1:
            raise ValueError("no tokens were scored")
        mean = self.total / self.tokens
        return mean if self.kind == "kl" else math.exp(mean)


def kl_divergence(dense_logits: torch.Tensor, logits: torch.Tensor) -> float:
    """Mean over tokens of KL(P_dense || Q_candidate), for logits (..., V) of the same positions."""
    return float(token_kl(dense_logits, logits).mean())


def perplexity_from_logits(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """exp(mean NLL) of ``targets`` (...) under ``logits`` (..., V) (already shifted: row t predicts target t)."""
    return math.exp(float(token_nll(logits, targets).mean()))
