"""Fitness of candidates as executor jobs: a model assembled from the level database, scored on windows.

A job is (candidate, a few windows); a candidate's windows may be split over several jobs, whose
``FitnessTotal`` sums are merged in a fixed order, so in-process and Ray scoring give the same numbers.
What the jobs read is stored once (``Executor.put``): the windows' token ids and, for the KL fitness,
the dense model's final hidden states (N, T, hidden); each job applies the (dense, shared) LM head to
them. The dense *logits* are not cached: 64 x 512 x 49152 float32 logits are 6.4 GB, the hidden states
75 MB, and the head costs about a quarter of a candidate's forward.

Each worker process keeps one assembled model (a module-level cache: Ray workers are long-lived) and
knows which level every layer holds, so a candidate that differs from the previous one in a few layers
(a mutant) reloads only those layers from the database. Dense copies are kept only for mask-only entries
(Wanda, magnitude): SparseGPT's entries hold their values, which saves a copy of every linear per worker.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch

from compressor.execution.base import Executor
from compressor.models.config import ModelConfig
from compressor.precision import Precision
from compressor.search.database import Database
from compressor.search.fitness import FitnessKind, FitnessTotal

Pick = tuple[int, int]  # (window index, predicted tokens used from its start)


@dataclass(frozen=True)
class ScoringSpec:
    model: ModelConfig
    database: Database
    names: tuple[str, ...]  # the search space's layers, in candidate order
    kind: FitnessKind
    precision: Precision = Precision()
    batch_size: int = 2


class Assembler:
    """A model whose prunable linears hold the database's weights at chosen levels."""

    def __init__(self, spec: ScoringSpec) -> None:
        from compressor.models import load_model

        self.spec = spec
        self.model = load_model(spec.model).model
        self.linears = {n: self.model.get_submodule(n) for n in spec.names}
        self.dense: dict[str, torch.Tensor] = {}  # copies kept only for entries that hold masks alone
        self.current: dict[str, Optional[int]] = {n: None for n in spec.names}  # None: dense

    def _dense(self, name: str) -> torch.Tensor:
        if name not in self.dense:
            if self.current[name] is not None:
                raise RuntimeError(f"{name}: its dense weight was overwritten before a mask-only entry needed it")
            self.dense[name] = self.linears[name].weight.detach().clone()
        return self.dense[name]

    def apply(self, levels: Sequence[int]) -> torch.nn.Module:
        for name, k in zip(self.spec.names, levels):
            if self.current[name] != int(k):
                weight = self.linears[name].weight
                new = self.spec.database.weight(name, int(k), weight.detach(), lambda: self._dense(name))
                weight.data.copy_(new)
                self.current[name] = int(k)
        return self.model


_CACHE: dict[ScoringSpec, Assembler] = {}


def forget_models() -> None:
    """Drop this process's assembled model (a new run may rebuild a database at the same path)."""
    _CACHE.clear()


def assembler(spec: ScoringSpec) -> Assembler:
    if spec not in _CACHE:
        _CACHE.clear()  # one model per process
        _CACHE[spec] = Assembler(spec)
    return _CACHE[spec]


@torch.no_grad()
def final_hidden(model: torch.nn.Module, ids: torch.Tensor, batch_size: int,
                 precision: Precision = Precision()) -> torch.Tensor:
    """(N, T) ids -> (N, T, hidden) float32 hidden states after the final norm (the LM head's input)."""
    out = []
    for start in range(0, ids.shape[0], batch_size):
        with precision.autocast():
            h = model.get_decoder()(input_ids=ids[start : start + batch_size], use_cache=False).last_hidden_state
        out.append(h.float())
    return torch.cat(out)


@torch.no_grad()
def score_windows(spec: ScoringSpec, levels: list[int], ids: torch.Tensor, dense_hidden: Optional[torch.Tensor],
                  picks: list[Pick]) -> FitnessTotal:
    """One job: the candidate ``levels`` on the picked windows, as a sum over their tokens."""
    model = assembler(spec).apply(levels)
    head = model.get_output_embeddings()
    windows = [w for w, _ in picks]
    hidden = final_hidden(model, ids[windows], spec.batch_size, spec.precision)  # (n, T, hidden)
    total = FitnessTotal(spec.kind)
    for row, (w, used) in enumerate(picks):
        logits = head(hidden[row, :used].to(head.weight.dtype)).float()  # (used, V)
        dense = None if dense_hidden is None else head(dense_hidden[w, :used].to(head.weight.dtype)).float()
        total.add_window(logits, ids[w, : used + 1], dense, tokens=used)
    return total


class Scorer:
    """Scores candidates on picks of the fitness windows through an executor; counts what it spends."""

    def __init__(self, executor: Executor, spec: ScoringSpec, ids: torch.Tensor, dense_hidden: Optional[torch.Tensor],
                 windows_per_job: int) -> None:
        self.executor, self.spec, self.windows_per_job = executor, spec, windows_per_job
        self.num_windows, self.seq_len = ids.shape
        self._spec = executor.put(spec)
        self._ids = executor.put(ids)
        self._hidden = None if dense_hidden is None else executor.put(dense_hidden)
        self._memo: dict[tuple[bytes, tuple[Pick, ...]], float] = {}

    def totals(self, candidates: Sequence[np.ndarray], picks: Sequence[Pick]) -> list[FitnessTotal]:
        chunks = [list(picks[i : i + self.windows_per_job]) for i in range(0, len(picks), self.windows_per_job)]
        handles = [self.executor.submit(score_windows, self._spec, [int(k) for k in c], self._ids, self._hidden, chunk)
                   for c in candidates for chunk in chunks]
        parts = self.executor.gather(handles)
        out = []
        for i in range(len(candidates)):
            total = FitnessTotal(self.spec.kind)
            for part in parts[i * len(chunks) : (i + 1) * len(chunks)]:
                total = total.merge(part)
            out.append(total)
        return out

    def score(self, candidates: Sequence[np.ndarray], picks: Sequence[Pick]) -> list[float]:
        return [t.value for t in self.totals(candidates, picks)]

    def score_fixed(self, candidates: Sequence[np.ndarray], picks: Sequence[Pick]) -> list[float]:
        """``score`` with a memo, for the fixed windows every plan's final fitness is measured on."""
        key = tuple(picks)
        todo = [c for c in candidates if (np.asarray(c).tobytes(), key) not in self._memo]
        for c, value in zip(todo, self.score(todo, picks) if todo else []):
            self._memo[(np.asarray(c).tobytes(), key)] = value
        return [self._memo[(np.asarray(c).tobytes(), key)] for c in candidates]


def all_tokens(num_windows: int, seq_len: int) -> list[Pick]:
    """Every prediction of the first ``num_windows`` windows."""
    return [(w, seq_len - 1) for w in range(num_windows)]

