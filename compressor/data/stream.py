"""An endless, resumable stream of training windows packed from streamed documents.

Each data-parallel rank reads its own share of the documents (``iter_documents``), tokenizes them
one at a time, follows each with EOS and cuts the token stream into windows of ``seq_len``; at the
end of its share the next epoch starts from the beginning. An optional shuffle buffer mixes windows
with a seeded generator. Memory holds one document's tokens, the leftover of the previous one and
the shuffle buffer, whatever the corpus size. ``state_dict`` captures the exact position (epoch,
documents consumed, leftover tokens, shuffle buffer, generator), so a resumed stream yields the very
same windows as an uninterrupted one.
"""

from __future__ import annotations

from typing import Any, Iterator, Optional

import torch

from compressor.data.config import DatasetConfig
from compressor.data.sources import iter_documents
from compressor.errors import DataError

STATE_KEYS = ("seq_len", "rank", "world_size", "shuffle_buffer")


class WindowStream:
    """Iterator of LongTensor windows (seq_len,); ``next_batch(B)`` stacks B of them."""

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
        if seq_len < 1 or shuffle_buffer < 0:
            raise ValueError(f"seq_len must be positive and shuffle_buffer >= 0, got {seq_len} and {shuffle_buffer}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        if tokenizer.eos_token_id is None:
            raise DataError("the tokenizer has no EOS token to join documents with; use a tokenizer that has one")
        self.cfg, self.tokenizer, self.seq_len = cfg, tokenizer, seq_len
        self.rank, self.world_size, self.shuffle_buffer = rank, world_size, shuffle_buffer
        self._rng = torch.Generator()
        self._rng.manual_seed(seed * 1_000_003 + rank)  # each rank shuffles differently
        self.epoch = 0
        self.docs = 0  # documents of this rank consumed in the current epoch
        self._tokens = torch.empty(0, dtype=torch.long)  # tokens not yet in a window, from _pos on
        self._pos = 0
        self._pool: list[torch.Tensor] = []
        self._docs_iter: Optional[Iterator[str]] = None

    # -- documents ------------------------------------------------------------------------------
    def _next_document(self) -> Optional[str]:
        """The next document of this rank, or None at the end of an epoch (the next one is set up)."""
        if self._docs_iter is None:
            self._docs_iter = iter_documents(self.cfg, rank=self.rank, world_size=self.world_size, start=self.docs)
        doc = next(self._docs_iter, None)
        if doc is None:
            self._docs_iter, self.epoch, self.docs = None, self.epoch + 1, 0
            return None
        self.docs += 1
        return doc

    def _fill(self) -> None:
        """Read documents until at least ``seq_len`` tokens are waiting."""
        pieces = [self._tokens[self._pos :]]
        have = pieces[0].numel()
        dry_epoch_ends = 0  # two epoch ends without a token in between: a whole epoch had no text
        while have < self.seq_len:
            doc = self._next_document()
            if doc is None:
                dry_epoch_ends += 1
                if dry_epoch_ends == 2:
                    raise DataError(
                        f"rank {self.rank} of {self.world_size} gets no text from {self.cfg.source!r} (its share "
                        "of the documents is empty); use a larger corpus, fewer ranks, or for a text file a "
                        "smaller chunk_bytes so that it splits into more documents"
                    )
                continue
            ids = self.tokenizer(doc, add_special_tokens=False)["input_ids"]
            if not ids:
                continue  # an empty document adds nothing, not even EOS
            pieces.append(torch.tensor(ids + [self.tokenizer.eos_token_id], dtype=torch.long))
            have += len(ids) + 1
            dry_epoch_ends = 0
        self._tokens, self._pos = torch.cat(pieces), 0

    def _next_window(self) -> torch.Tensor:
        if self._tokens.numel() - self._pos < self.seq_len:
            self._fill()
        window = self._tokens[self._pos : self._pos + self.seq_len].clone()  # a copy: never pins the buffer
        self._pos += self.seq_len
        return window

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
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        return torch.stack([next(self) for _ in range(batch_size)])  # (B, seq_len)

    # -- exact resume ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The exact position; token ids are stored as int32 (every vocabulary fits)."""
        pool = torch.stack(self._pool) if self._pool else torch.empty(0, self.seq_len, dtype=torch.long)
        return {
            "epoch": self.epoch,
            "docs": self.docs,
            "carry": self._tokens[self._pos :].to(torch.int32),  # a copy, by the dtype change
            "pool": pool.to(torch.int32),
            "rng": self._rng.get_state(),
            **{key: getattr(self, key) for key in STATE_KEYS},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in STATE_KEYS:
            if key in state and state[key] != getattr(self, key):
                raise DataError(f"cannot resume the data stream: it was saved with {key}={state[key]}, now "
                                f"{getattr(self, key)}; resume with the same {key}")
        self.epoch, self.docs = int(state["epoch"]), int(state["docs"])
        self._tokens, self._pos = torch.as_tensor(state["carry"], dtype=torch.long).clone(), 0
        self._pool = [torch.as_tensor(w, dtype=torch.long).clone() for w in state["pool"]]
        self._rng.set_state(state["rng"])
        self._docs_iter = None  # reopened lazily, skipping the documents already consumed
