"""An endless, resumable stream of training windows packed from streamed documents.

Documents (this rank's share) are tokenized one at a time, joined with EOS and cut into windows of
``seq_len``; at the end of the corpus the next epoch starts. An optional shuffle buffer mixes windows
with a seeded generator. ``state_dict`` captures the exact position (epoch, documents consumed,
carried-over tokens, shuffle buffer, generator), so a resumed stream yields the very same windows.
"""

from __future__ import annotations

from typing import Any, Iterator, Optional

import torch

from compressor.data.config import DatasetConfig
from compressor.data.sources import iter_documents
from compressor.errors import DataError


class WindowStream:
    def __init__(
        self,
        cfg: DatasetConfig,
        tokenizer,
        seq_len: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle_buffer: int = 0,
    ) -> None:
        if tokenizer.eos_token_id is None:
            raise DataError("the tokenizer has no EOS token to join documents with")
        self.cfg, self.tokenizer, self.seq_len = cfg, tokenizer, seq_len
        self.rank, self.world_size, self.shuffle_buffer = rank, world_size, shuffle_buffer
        self._rng = torch.Generator().manual_seed(seed * 1_000_003 + rank)
        self.epoch = 0
        self.docs = 0  # documents of this rank consumed in the current epoch
        self._carry: list[int] = []
        self._pool: list[torch.Tensor] = []
        self._docs_iter: Optional[Iterator[str]] = None

    # -- documents ------------------------------------------------------------------------------
    def _next_document(self) -> str:
        for attempt in range(2):
            if self._docs_iter is None:
                self._docs_iter = iter_documents(self.cfg, rank=self.rank, world_size=self.world_size, start=self.docs)
            doc = next(self._docs_iter, None)
            if doc is not None:
                self.docs += 1
                return doc
            self._docs_iter, self.epoch, self.docs = None, self.epoch + 1, 0
        raise DataError(f"rank {self.rank} of {self.world_size} gets no documents from {self.cfg.source!r}")

    def _next_window(self) -> torch.Tensor:
        while len(self._carry) < self.seq_len:
            ids = self.tokenizer(self._next_document(), add_special_tokens=False)["input_ids"]
            self._carry += ids + [self.tokenizer.eos_token_id]
        window, self._carry = self._carry[: self.seq_len], self._carry[self.seq_len :]
        return torch.tensor(window, dtype=torch.long)

    # -- windows --------------------------------------------------------------------------------
    def __iter__(self) -> "WindowStream":
        return self

    def __next__(self) -> torch.Tensor:
        if not self.shuffle_buffer:
            return self._next_window()
        while len(self._pool) < self.shuffle_buffer:
            self._pool.append(self._next_window())
        pick = int(torch.randint(len(self._pool), (1,), generator=self._rng))
        window = self._pool[pick]
        self._pool[pick] = self._next_window()
        return window

    def next_batch(self, batch_size: int) -> torch.Tensor:
        return torch.stack([next(self) for _ in range(batch_size)])  # (B, seq_len)

    # -- exact resume ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch, "docs": self.docs, "carry": list(self._carry),
            "pool": [w.clone() for w in self._pool], "rng": self._rng.get_state(),
            "seq_len": self.seq_len, "rank": self.rank, "world_size": self.world_size,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("seq_len", "rank", "world_size"):
            if state[key] != getattr(self, key):
                raise DataError(f"cannot resume the data stream: it was saved with {key}={state[key]}, "
                                f"now {getattr(self, key)}")
        self.epoch, self.docs, self._carry = state["epoch"], state["docs"], list(state["carry"])
        self._pool = [w.clone() for w in state["pool"]]
        self._rng.set_state(state["rng"])
        self._docs_iter = None  # reopened lazily, skipping the documents already consumed
