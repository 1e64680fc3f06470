"""Token ids and fixed-length windows, exactly as ../shared/BENCHMARK.md prescribes.

A source that is one text file is tokenized once as one string without special tokens (the
benchmark protocol); other sources are tokenized per document, each document followed by the EOS
token (a text file inside a folder is one document). Token ids are cached on disk under
``$COMPRESSOR_CACHE/tokens`` (default ``~/.cache/compressor/tokens``), keyed by the files' contents,
the source options and the tokenizer, so that repeated runs skip tokenization.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Iterator, Optional, Union

import torch
from safetensors.torch import load_file

from compressor.data.builtin import BUILTIN
from compressor.data.config import DatasetConfig
from compressor.data.sources import (
    file_format, file_records, iter_documents, read_text_chunks, source_files,
)
from compressor.errors import DataError
from compressor.utils.cache import cache_root
from compressor.utils.env import release_freed_memory
from compressor.utils.fs import atomic_save_safetensors
from compressor.utils.logging import get_logger

log = get_logger(__name__)
# Larger text files are tokenized piece by piece: one string of N characters costs about 40 N bytes
# of Python lists and tokenizer encodings at its peak.
WHOLE_FILE_LIMIT = 32 << 20
HASH_WHOLE_LIMIT = 64 << 20  # larger files are fingerprinted by size, mtime and their first/last MiB
FLUSH_TOKENS = 1 << 20  # Python ints are moved into int32 tensors this often, to bound memory


def cache_dir() -> Path:
    return cache_root() / "tokens"


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of everything that decides the token ids: vocabulary, merges, normalizer, EOS."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        text = backend.to_str()
    else:
        text = json.dumps(sorted(tokenizer.get_vocab().items())) + type(tokenizer).__name__
    text += f"|eos={tokenizer.eos_token_id}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _file_fingerprint(path: Path) -> list:
    stat = path.stat()
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as fh:
        if stat.st_size <= HASH_WHOLE_LIMIT:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
            return [str(path.resolve()), stat.st_size, h.hexdigest()]
        h.update(fh.read(1 << 20))
        fh.seek(-(1 << 20), os.SEEK_END)
        h.update(fh.read())
    return [str(path.resolve()), stat.st_size, stat.st_mtime_ns, h.hexdigest()]


def _cache_key(cfg: DatasetConfig, tokenizer, max_tokens: Optional[int]) -> Optional[str]:
    if cfg.source.startswith("hf:"):
        return None  # a remote dataset cannot be fingerprinted cheaply: not cached
    if cfg.source.startswith("builtin:"):
        if cfg.source not in BUILTIN:
            return None  # iter_documents raises the error
        docs = BUILTIN[cfg.source](cfg.split or "train")
        content: object = [sys.version, hashlib.blake2b("\0".join(docs).encode(), digest_size=16).hexdigest()]
    else:
        content = [_file_fingerprint(p) for p in source_files(cfg)]
    key = json.dumps([content, cfg.model_dump(mode="json"), max_tokens, tokenizer_fingerprint(tokenizer)])
    return hashlib.sha256(key.encode()).hexdigest()[:24]


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _text_file_ids(path: Path, tokenizer, chunk_bytes: int) -> Iterator[list[int]]:
    if path.stat().st_size <= WHOLE_FILE_LIMIT:
        try:
            text = path.read_text(encoding="utf-8")  # universal newlines, as the protocol's counts assume
        except UnicodeDecodeError as exc:
            raise DataError(f"{path}: not UTF-8 text ({exc.reason}); convert it to UTF-8") from None
        yield _encode(tokenizer, text)
        return
    # Too big for one string: pieces end at line ends, where BPE merges rarely cross.
    log.info("%s is larger than %d MiB: tokenizing it piece by piece", path, WHOLE_FILE_LIMIT >> 20)
    for chunk in read_text_chunks(path, chunk_bytes):
        yield _encode(tokenizer, chunk)


def _pieces(cfg: DatasetConfig, tokenizer) -> Iterator[list[int]]:
    """Lists of token ids whose concatenation is the source's token stream."""
    path = Path(cfg.source).expanduser()
    if path.is_file() and file_format(path, cfg.format) == "text":
        yield from _text_file_ids(path, tokenizer, cfg.chunk_bytes)
        return
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError("the tokenizer has no EOS token to separate documents with; give a single text file "
                        "or a tokenizer with an EOS token")
    if path.is_dir():
        for file in source_files(cfg):
            fmt = file_format(file, cfg.format)
            if fmt == "text":
                yield from _text_file_ids(file, tokenizer, cfg.chunk_bytes)
                yield [eos]
                continue
            for doc in file_records(file, cfg):
                if doc:
                    yield _encode(tokenizer, doc) + [eos]
        return
    for doc in iter_documents(cfg):
        if doc:
            yield _encode(tokenizer, doc) + [eos]


def _tokenize(cfg: DatasetConfig, tokenizer, max_tokens: Optional[int]) -> torch.Tensor:
    parts: list[torch.Tensor] = []
    pending: list[int] = []
    total = 0
    for ids in _pieces(cfg, tokenizer):
        pending += ids
        total += len(ids)
        if len(pending) >= FLUSH_TOKENS:
            parts.append(torch.tensor(pending, dtype=torch.int32))
            pending = []
        if max_tokens and total >= max_tokens:
            break
    parts.append(torch.tensor(pending, dtype=torch.int32))
    ids = torch.cat(parts)
    return ids[:max_tokens] if max_tokens else ids


def load_token_ids(
    cfg: Union[DatasetConfig, str, Path], tokenizer, *, max_tokens: Optional[int] = None
) -> torch.Tensor:
    """All token ids of a source (at most ``max_tokens``, else ``cfg.max_tokens``) as a 1-D LongTensor.

    The result is cached on disk; the second call with the same files, options and tokenizer reads it.
    """
    if not isinstance(cfg, DatasetConfig):
        cfg = DatasetConfig(source=str(cfg))
    max_tokens = max_tokens or cfg.max_tokens
    key = _cache_key(cfg, tokenizer, max_tokens)
    cached = cache_dir() / f"{key}.safetensors" if key else None
    if cached is not None and cached.is_file():
        try:
            ids = load_file(str(cached)).get("ids")
            if isinstance(ids, torch.Tensor) and ids.dim() == 1 and not ids.is_floating_point():
                log.debug("token ids of %s from the cache %s", cfg.source, cached)
                return ids.long()
        except Exception:
            pass
        log.warning("ignoring the unreadable token cache %s; tokenizing again", cached)
    ids = _tokenize(cfg, tokenizer, max_tokens)
    release_freed_memory()  # the tokenizer's freed blocks would stay in the RSS of the whole run
    if ids.numel() == 0:
        raise DataError(f"data source {cfg.source!r} yields no tokens; it holds no text")
    if cached is not None:
        atomic_save_safetensors({"ids": ids}, cached)  # int32: half the space of int64, and every vocabulary fits
    return ids.long()


def _need(n: int, need: int, length: int, what: str) -> None:
    if n < need:
        raise DataError(f"{what}: {n} tokens are too few for a window of {length} (need at least {need}); "
                        "use a longer text or a shorter seq_len")


def calibration_windows(
    token_ids: torch.Tensor, num_windows: int = 128, length: int = 512, seed: int = 0
) -> torch.Tensor:
    """(num_windows, length) windows at random starts, drawn exactly as BENCHMARK.md says: a generator
    seeded with ``seed``, one ``torch.randint(0, n - length - 1, (1,))`` per window, in order."""
    if num_windows < 1 or length < 1:
        raise ValueError(f"num_windows and length must be positive, got {num_windows} and {length}")
    n = token_ids.numel()
    _need(n, length + 2, length, "calibration data")  # randint needs high = n - length - 1 >= 1
    g = torch.Generator()
    g.manual_seed(seed)
    starts = [int(torch.randint(0, n - length - 1, (1,), generator=g)) for _ in range(num_windows)]
    return torch.stack([token_ids[s : s + length] for s in starts]).long()  # (num_windows, length)


def eval_windows(token_ids: torch.Tensor, length: int = 512, limit: Optional[int] = None) -> torch.Tensor:
    """(W, length) non-overlapping windows from the start, the remainder dropped; the first ``limit``."""
    if length < 1 or (limit is not None and limit < 1):
        raise ValueError(f"length and limit must be positive, got {length} and {limit}")
    n = token_ids.numel()
    _need(n, length, length, "evaluation data")
    count = n // length if limit is None else min(n // length, limit)
    return token_ids[: count * length].reshape(count, length).long()  # (W, length)
