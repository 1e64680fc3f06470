"""Data: streamed sources (text, JSONL, Parquet, builtin, hf), token ids, windows, training streams."""

from compressor.data.config import DatasetConfig
from compressor.data.sources import iter_documents
from compressor.data.stream import WindowStream
from compressor.data.tokens import calibration_windows, eval_windows, load_token_ids

__all__ = ["DatasetConfig", "iter_documents", "WindowStream", "calibration_windows", "eval_windows", "load_token_ids"]
