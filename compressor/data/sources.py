"""Documents from a source, as a stream: memory stays bounded whatever the corpus size.

- text files are read in chunks of about 16 KiB cut at line ends (one chunk = one document);
- JSONL and Parquet are read through pyarrow, Parquet row group by row group;
- ``builtin:`` corpora and ``hf:`` datasets (streaming mode) are iterated as they come.
Document ``i`` goes to data-parallel rank ``i % world_size``, so ranks read disjoint parts.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

from compressor.data.builtin import BUILTIN
from compressor.data.config import DatasetConfig
from compressor.errors import DataError

TEXT_SUFFIXES = {".txt", ".raw", ".tokens", ".text", ".md"}
JSONL_SUFFIXES = {".jsonl", ".json", ".ndjson"}
PARQUET_SUFFIXES = {".parquet", ".pq"}
CHUNK_BYTES = 1 << 14  # small enough that data-parallel ranks of a modest file all get text


def file_format(path: Path, declared: str = "auto") -> str:
    if declared != "auto":
        return declared
    suffix = path.suffix.lower()
    for fmt, suffixes in (("text", TEXT_SUFFIXES), ("jsonl", JSONL_SUFFIXES), ("parquet", PARQUET_SUFFIXES)):
        if suffix in suffixes:
            return fmt
    raise DataError(
        f"{path}: cannot tell the format from the extension {suffix!r}; rename it (.txt, .jsonl, .parquet) "
        "or set format: text | jsonl | parquet"
    )


def source_files(cfg: DatasetConfig) -> list[Path]:
    path = Path(cfg.source).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
        if cfg.format == "auto":
            known = TEXT_SUFFIXES | JSONL_SUFFIXES | PARQUET_SUFFIXES
            files = [p for p in files if p.suffix.lower() in known]
        if not files:
            raise DataError(f"folder {path} holds no .txt/.jsonl/.parquet files")
        return files
    raise DataError(
        f"data source {cfg.source!r} is neither a file, a folder, 'builtin:python-docs' nor 'hf:<dataset>'"
    )


def read_text_chunks(path: Path, chunk_bytes: int = CHUNK_BYTES) -> Iterator[str]:
    with open(path, "r", encoding="utf-8", errors="replace", newline="") as fh:
        while True:
            chunk = fh.read(chunk_bytes)
            if not chunk:
                return
            rest = fh.readline()  # finish the current line, so no line is cut in two
            yield chunk + rest


def read_jsonl(path: Path, field: str) -> Iterator[str]:
    with open(path, "r", encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
            if not isinstance(row, dict) or field not in row:
                raise DataError(f"{path}:{lineno}: no key {field!r}; set text_field to the key holding the text")
            yield str(row[field])


def read_parquet(path: Path, field: str) -> Iterator[str]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as exc:
        raise DataError(f"{path}: not a readable Parquet file ({exc})") from exc
    if field not in pf.schema_arrow.names:
        raise DataError(f"{path}: no column {field!r} (columns: {pf.schema_arrow.names}); set text_field")
    for group in range(pf.num_row_groups):  # one row group in memory at a time
        for value in pf.read_row_group(group, columns=[field]).column(0).to_pylist():
            if value is not None:
                yield str(value)


def _hf_documents(cfg: DatasetConfig) -> Iterator[str]:
    try:
        import datasets
    except ImportError:
        raise DataError(f"{cfg.source} needs the `datasets` package: pip install datasets") from None
    name = cfg.source[len("hf:"):]
    ds = datasets.load_dataset(name, cfg.hf_config, split=cfg.split or "train", streaming=True)
    for row in ds:
        if cfg.text_field not in row:
            raise DataError(f"{cfg.source}: no field {cfg.text_field!r} (fields: {list(row)}); set text_field")
        yield str(row[cfg.text_field])


def _all_documents(cfg: DatasetConfig) -> Iterator[str]:
    if cfg.source in BUILTIN:
        yield from BUILTIN[cfg.source](cfg.split or "train")
        return
    if cfg.source.startswith("builtin:"):
        raise DataError(f"unknown builtin corpus {cfg.source!r}; available: {sorted(BUILTIN)}")
    if cfg.source.startswith("hf:"):
        yield from _hf_documents(cfg)
        return
    for path in source_files(cfg):
        fmt = file_format(path, cfg.format)
        if fmt == "text":
            yield from read_text_chunks(path)
        elif fmt == "jsonl":
            yield from read_jsonl(path, cfg.text_field)
        else:
            yield from read_parquet(path, cfg.text_field)


def iter_documents(cfg: DatasetConfig, *, rank: int = 0, world_size: int = 1, start: int = 0) -> Iterator[str]:
    """Documents of this rank, skipping the first ``start`` of them (counted over this rank's share)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world size {world_size}")
    mine = 0
    empty = True
    for i, doc in enumerate(_all_documents(cfg)):
        empty = False
        if i % world_size != rank:
            continue
        if mine >= start:
            yield doc
        mine += 1
    if empty:
        raise DataError(f"data source {cfg.source!r} holds no documents")

