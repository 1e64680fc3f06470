"""Token ids and fixed-length windows, exactly as ../shared/BENCHMARK.md prescribes.

A single text file is tokenized once as one string without special tokens; other sources are
tokenized per document and joined with the EOS token. Token ids are cached on disk (keyed by the
file's size and mtime, the source options and the tokenizer), so repeated runs skip tokenization.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Optional, Union

import torch

from compressor.data.config import DatasetConfig
from compressor.data.sources import file_format, iter_documents, read_text_chunks
from compressor.errors import DataError
from compressor.utils.fs import atomic_torch_save
from compressor.utils.logging import get_logger

log = get_logger(__name__)
WHOLE_FILE_LIMIT = 256 << 20  # larger text files are tokenized chunk by chunk


def cache_dir() -> Path:
    root = os.environ.get("COMPRESSOR_CACHE") or Path.home() / ".cache" / "compressor"
    return Path(root) / "tokens"


def tokenizer_fingerprint(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _cache_key(cfg: DatasetConfig, tokenizer, max_tokens: Optional[int]) -> Optional[str]:
    path = Path(cfg.source).expanduser()
    if not path.exists():
        return None  # builtin and hf sources are cheap or remote: not cached
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    stamp = [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    key = json.dumps([stamp, cfg.model_dump(mode="json"), max_tokens, tokenizer_fingerprint(tokenizer)])
    return hashlib.sha256(key.encode()).hexdigest()[:24]


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _tokenize(cfg: DatasetConfig, tokenizer, max_tokens: Optional[int]) -> torch.Tensor:
    path = Path(cfg.source).expanduser()
    if path.is_file() and file_format(path, cfg.format) == "text":
        if path.stat().st_size <= WHOLE_FILE_LIMIT:
            ids = _encode(tokenizer, path.read_text(encoding="utf-8", errors="replace"))
        else:
            ids = [t for chunk in read_text_chunks(path) for t in _encode(tokenizer, chunk)]
        return torch.tensor(ids[:max_tokens] if max_tokens else ids, dtype=torch.long)
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError("the tokenizer has no EOS token to join documents with")
    ids: list[int] = []
    for doc in iter_documents(cfg):
        ids += _encode(tokenizer, doc) + [eos]
        if max_tokens and len(ids) >= max_tokens:
            return torch.tensor(ids[:max_tokens], dtype=torch.long)
    return torch.tensor(ids, dtype=torch.long)


def load_token_ids(
    cfg: Union[DatasetConfig, str, Path], tokenizer, *, max_tokens: Optional[int] = None
) -> torch.Tensor:
    """All token ids of a (modest) source as one 1-D LongTensor, cached on disk."""
    if not isinstance(cfg, DatasetConfig):
        cfg = DatasetConfig(source=str(cfg))
    max_tokens = max_tokens or cfg.max_tokens
    key = _cache_key(cfg, tokenizer, max_tokens)
    cached = cache_dir() / f"{key}.pt" if key else None
    if cached is not None and cached.is_file():
        try:
            return torch.load(cached).long()
        except Exception:  # a damaged cache entry is rebuilt
            log.warning("ignoring unreadable token cache %s", cached)
    ids = _tokenize(cfg, tokenizer, max_tokens)
    if ids.numel() == 0:
        raise DataError(f"data source {cfg.source!r} yields no tokens")
    if cached is not None:
        dtype = torch.int32 if ids.max() < 2**31 else torch.long
        atomic_torch_save(ids.to(dtype), cached)
    return ids


def _check_length(n: int, length: int, need: int, what: str) -> None:
    if n < need:
        raise DataError(f"{what}: {n} tokens are too few for windows of {length}; use a larger text or a shorter seq_len")


def calibration_windows(token_ids: torch.Tensor, num_windows: int = 128, length: int = 512, seed: int = 0) -> torch.Tensor:
    """(num_windows, length) windows at random starts: one ``torch.randint(0, n - length - 1, (1,))`` each
    from a generator seeded with ``seed`` (BENCHMARK.md)."""
    n = token_ids.numel()
    _check_length(n, length, length + 2, "calibration data")
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(num_windows):
        start = int(torch.randint(0, n - length - 1, (1,), generator=g))
        rows.append(token_ids[start : start + length])
    return torch.stack(rows).long()


def eval_windows(token_ids: torch.Tensor, length: int = 512, limit: Optional[int] = None) -> torch.Tensor:
    """Non-overlapping (W, length) windows from the start; the remainder is dropped."""
    n = token_ids.numel()
    _check_length(n, length, length, "evaluation data")
    count = n // length
    if limit is not None:
        count = min(count, limit)
    return token_ids[: count * length].reshape(count, length).long()
