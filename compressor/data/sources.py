"""Documents from a source, as a stream: memory stays bounded whatever the corpus size.

A *document* is one record of the source: a piece of a text file cut at a line end (at most about
``chunk_bytes`` characters, see ``text_piece_size``), one JSONL line, one Parquet row, one builtin
topic, one ``hf:`` row, one unit of the training corpus (``corpus:train``, read as its Parquet folder).
Document ``i`` of the source goes to data-parallel rank ``i % world_size``; ``start`` skips a rank's
first documents, cheaply where the format allows (Parquet row groups and files from metadata).
Readers are generators that yield the documents after the first ``skip`` and *return* the number
of documents in the file, so that a skip can carry over to the next file of a folder.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Generator, Iterator

from compressor.data.builtin import BUILTIN
from compressor.data.config import DatasetConfig
from compressor.data.corpus import corpus_split_dir, is_corpus_source
from compressor.errors import DataError

TEXT_SUFFIXES = {".txt", ".raw", ".tokens", ".text", ".md"}
JSONL_SUFFIXES = {".jsonl", ".json", ".ndjson"}
PARQUET_SUFFIXES = {".parquet", ".pq"}
CHUNK_BYTES = 1 << 20
# A text file is cut into at least this many documents (of at least TEXT_MIN_PIECE characters),
# so that data-parallel ranks each get a share of a modest file.
TEXT_MIN_DOCS = 64
TEXT_MIN_PIECE = 4096
JSON_BLOCK_BYTES = 1 << 20  # pyarrow parses JSONL in blocks of this size
PARQUET_BATCH_ROWS = 1024  # rows converted to Python at a time, within one row group

Records = Generator[str, None, int]


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
    """The files of a path source: the file itself, or a folder's supported files in sorted order.
    A ``corpus:`` name is the folder of that split's shards."""
    path = corpus_split_dir(cfg.source) if is_corpus_source(cfg.source) else Path(cfg.source).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        hidden = lambda p: any(part.startswith(".") for part in p.relative_to(path).parts)  # noqa: E731
        files = sorted(p for p in path.rglob("*") if p.is_file() and not hidden(p))
        if cfg.format == "auto":
            known = TEXT_SUFFIXES | JSONL_SUFFIXES | PARQUET_SUFFIXES
            files = [p for p in files if p.suffix.lower() in known]
        if not files:
            raise DataError(f"folder {path} holds no .txt/.raw/.tokens, .jsonl or .parquet files; put the corpus there "
                            "or point source at a file")
        return files
    raise DataError(
        f"data source {cfg.source!r} does not exist: it is neither a file, a folder, 'builtin:python-docs', "
        "'corpus:train' / 'corpus:heldout' nor 'hf:<dataset>' (relative paths are resolved from the directory you run in)"
    )


def read_text_chunks(path: Path, chunk_bytes: int = CHUNK_BYTES) -> Iterator[str]:
    """Pieces of about ``chunk_bytes`` characters, each ending at a line end (a line longer than
    ``chunk_bytes`` is cut), so at most ``2 * chunk_bytes`` characters are in memory."""
    # Universal newlines, as Python reads text by default: the benchmark's token counts assume it.
    try:
        with open(path, "r", encoding="utf-8") as fh:
            while True:
                chunk = fh.read(chunk_bytes)
                if not chunk:
                    return
                if not chunk.endswith("\n"):
                    chunk += fh.readline(chunk_bytes)  # finish the line, within bounds
                yield chunk
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start} of a block); "
                        "convert it to UTF-8") from None


def text_piece_size(file_bytes: int, chunk_bytes: int) -> int:
    """Characters per document of a text file: at most ``chunk_bytes``, and small enough for the file
    to make about ``TEXT_MIN_DOCS`` documents unless that would make them shorter than ``TEXT_MIN_PIECE``."""
    return min(chunk_bytes, max(TEXT_MIN_PIECE, -(-file_bytes // TEXT_MIN_DOCS)))


def _text_records(path: Path, chunk_bytes: int, skip: int) -> Records:
    count = 0
    for chunk in read_text_chunks(path, text_piece_size(path.stat().st_size, chunk_bytes)):
        if count >= skip:
            yield chunk
        count += 1
    return count


def _jsonl_lines(path: Path, field: str, skip: int) -> Records:
    """Line by line, for records larger than a pyarrow block."""
    count = 0
    with open(path, "r", encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            if count >= skip:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
                value = row.get(field) if isinstance(row, dict) else None
                if not isinstance(value, str):
                    raise DataError(f"{path}:{lineno}: no string under the key {field!r}; set text_field to the key "
                                    "holding the text")
                yield value
            count += 1
    return count


def read_jsonl(path: Path, field: str, skip: int = 0) -> Records:
    """JSON Lines through pyarrow's streaming reader: one block (about 1 MiB) at a time, and only
    the text field is parsed into columns."""
    import pyarrow as pa
    import pyarrow.json as pj

    parse = pj.ParseOptions(explicit_schema=pa.schema([(field, pa.string())]), unexpected_field_behavior="ignore")
    count = 0
    try:
        reader = pj.open_json(path, read_options=pj.ReadOptions(block_size=JSON_BLOCK_BYTES), parse_options=parse)
        for batch in reader:
            rows = batch.num_rows
            if count + rows > skip:
                column = batch.column(0)
                if column.null_count:
                    first = count + column.is_null().index(True).as_py()
                    raise DataError(f"{path}: record {first} (counting non-blank lines from 0) has no string under "
                                    f"the key {field!r}; set text_field to the key holding the text")
                yield from column.to_pylist()[max(0, skip - count):]
            count += rows
    except pa.ArrowInvalid as exc:
        if "straddl" in str(exc):  # a record larger than a block: go on line by line from here
            return (yield from _jsonl_lines(path, field, max(skip, count)))
        if "Empty JSON" in str(exc):  # no records at all
            return 0
        raise DataError(f"{path}: not JSON Lines with a string under {field!r} ({exc}); give one JSON object "
                        "per line, or set text_field / format") from None
    return count


def read_parquet(path: Path, field: str, skip: int = 0) -> Records:
    """One row group at a time, only the text column, in batches of at most ``PARQUET_BATCH_ROWS``
    rows; row groups before ``skip`` are passed over using the row counts in the file's metadata.
    A null value is an empty document."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as exc:
        raise DataError(f"{path}: not a readable Parquet file ({exc})") from None
    schema = pf.schema_arrow
    if field not in schema.names:
        raise DataError(f"{path}: no column {field!r} (columns: {schema.names}); set text_field to the text column")
    kind = schema.field(field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind)):
        raise DataError(f"{path}: column {field!r} holds {kind}, not text; set text_field to the text column")
    count = 0
    for group in range(pf.num_row_groups):
        rows = pf.metadata.row_group(group).num_rows
        if count + rows > skip:
            for batch in pf.iter_batches(batch_size=PARQUET_BATCH_ROWS, row_groups=[group], columns=[field]):
                offset = max(0, skip - count)
                yield from ("" if v is None else v for v in batch.column(0).to_pylist()[offset:])
                count += batch.num_rows
        else:
            count += rows
    return count


def file_records(path: Path, cfg: DatasetConfig, skip: int = 0) -> Records:
    """The documents of one file in its format, after skipping ``skip``; returns how many it holds."""
    fmt = file_format(path, cfg.format)
    if fmt == "text":
        return _text_records(path, cfg.chunk_bytes, skip)
    if fmt == "jsonl":
        return read_jsonl(path, cfg.text_field, skip)
    return read_parquet(path, cfg.text_field, skip)


def _file_records(cfg: DatasetConfig, skip: int) -> Records:
    total = 0
    for path in source_files(cfg):
        count = yield from file_records(path, cfg, skip)
        skip = max(0, skip - count)
        total += count
    return total


def _hf_records(cfg: DatasetConfig, skip: int) -> Records:
    try:
        import datasets
    except ImportError:
        raise DataError(f"data source {cfg.source!r} needs the Hugging Face `datasets` package: "
                        "pip install datasets") from None
    name, split = cfg.source[len("hf:"):], cfg.split or "train"
    if not name:
        raise DataError("data source 'hf:' names no dataset; write hf:<name>, e.g. hf:Salesforce/wikitext")
    try:
        ds = datasets.load_dataset(name, cfg.hf_config, split=split, streaming=True)
    except Exception as exc:
        raise DataError(
            f"could not open the Hugging Face dataset {name!r} (hf_config={cfg.hf_config!r}, split={split!r}): "
            f"{type(exc).__name__}: {exc}. Check the name, hf_config and split, and the network connection"
        ) from exc
    features = getattr(ds, "features", None)
    if features is not None and cfg.text_field not in features:
        raise DataError(f"hf dataset {name!r} has no field {cfg.text_field!r} (fields: {list(features)}); "
                        "set text_field")
    seen = 0
    for row in ds.skip(skip) if skip else ds:
        if cfg.text_field not in row:
            raise DataError(f"hf dataset {name!r} has no field {cfg.text_field!r} (fields: {list(row)}); "
                            "set text_field")
        value = row[cfg.text_field]
        yield "" if value is None else str(value)
        seen += 1
    return skip + seen  # an upper bound when skipping past the end; only emptiness is judged from it


def _records(cfg: DatasetConfig, skip: int) -> Records:
    """Every document of the source in order, without the first ``skip``; returns the total count."""
    if cfg.source.startswith("builtin:"):
        if cfg.source not in BUILTIN:
            raise DataError(f"unknown builtin corpus {cfg.source!r}; available: {sorted(BUILTIN)}")
        docs = BUILTIN[cfg.source](cfg.split or "train")
        yield from docs[skip:]
        return len(docs)
    if cfg.source.startswith("hf:"):
        return (yield from _hf_records(cfg, skip))
    return (yield from _file_records(cfg, skip))


def iter_documents(cfg: DatasetConfig, *, rank: int = 0, world_size: int = 1, start: int = 0) -> Iterator[str]:
    """This rank's documents (source documents ``rank, rank + world_size, ...``), without its first
    ``start``. Raises DataError if the source holds no documents at all."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world size {world_size}")
    if start < 0:
        raise ValueError(f"start must be >= 0, got {start}")
    first = rank + start * world_size  # source index of this rank's start-th document
    records = _records(cfg, first)
    index = first
    while True:
        try:
            doc = next(records)
        except StopIteration as stop:
            total = stop.value
            break
        if (index - rank) % world_size == 0:
            yield doc
        index += 1
    if total == 0:
        raise DataError(f"data source {cfg.source!r} holds no documents; check that the file(s) are not empty")
