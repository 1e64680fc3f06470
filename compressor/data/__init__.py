"""Data: streamed sources (text, JSONL, Parquet, builtin, hf), token ids, windows, training streams."""

from compressor.data.config import DatasetConfig
from compressor.data.sources import iter_documents
from compressor.data.stream import WindowStream
from compressor.data.tokens import calibration_windows, cache_dir, eval_windows, load_token_ids, tokenizer_fingerprint

__all__ = [
    "DatasetConfig",
    "iter_documents",
    "WindowStream",
    "load_token_ids",
    "calibration_windows",
    "eval_windows",
    "cache_dir",
    "tokenizer_fingerprint",
]
