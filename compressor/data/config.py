"""Where text comes from."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import PositiveInt

from compressor.config.base import InputPath, StrictModel


class DatasetConfig(StrictModel):
    # builtin:python-docs   offline English text that ships with every CPython (the default)
    # a path               a .txt/.raw/.tokens, .jsonl/.json or .parquet file, or a folder of them
    # hf:<name>            a Hugging Face dataset (needs network and the `datasets` package)
    # corpus:train         the offline training corpus built by `make corpus`; corpus:heldout for validation
    source: InputPath = "builtin:python-docs"
    format: Literal["auto", "text", "jsonl", "parquet"] = "auto"
    text_field: str = "text"  # the column / JSON key holding the text (JSONL, Parquet, hf)
    split: Optional[str] = None  # builtin: train | eval (default train); hf: a split name (default train)
    hf_config: Optional[str] = None  # hf: the dataset's configuration name, e.g. wikitext-2-raw-v1
    max_tokens: Optional[PositiveInt] = None  # stop reading after this many tokens
    # Text files are streamed as documents of at most about this many characters, cut at line ends;
    # a file is cut into at least ~64 documents (of >= 4 KiB) so that data-parallel ranks all get text.
    chunk_bytes: PositiveInt = 1 << 20
