"""Every source format streams its documents in bounded pieces, shards disjointly, and fails clearly."""

import json
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from compressor.data import DatasetConfig, iter_documents
from compressor.data import sources
from compressor.errors import DataError

DOCS = [f"Document number {i} talks about topic {i % 7}." for i in range(23)]


def _parquet(path, docs, row_group_size=5, column="text"):
    pq.write_table(pa.table({column: docs, "id": list(range(len(docs)))}), path, row_group_size=row_group_size)
    return path


def _jsonl(path, docs, key="text"):
    # other keys of varying types are ignored; blank lines are not records
    rows = [json.dumps({key: d, "meta": i if i % 2 else {"x": [i]}}) for i, d in enumerate(docs)]
    path.write_text("\n".join(rows[:3]) + "\n\n" + "\n".join(rows[3:]) + "\n")
    return path


def _text(path, docs):
    path.write_text("".join(d + "\n" for d in docs))
    return path


def docs_of(source, **kw):
    return list(iter_documents(DatasetConfig(source=str(source), **kw.pop("cfg", {})), **kw))


# -- formats ------------------------------------------------------------------------------------

def test_jsonl_and_parquet_yield_one_document_per_record(tmp_path):
    assert docs_of(_jsonl(tmp_path / "a.jsonl", DOCS)) == DOCS
    assert docs_of(_parquet(tmp_path / "b.parquet", DOCS)) == DOCS
    assert docs_of(_parquet(tmp_path / "c.bin", DOCS), cfg=dict(format="parquet")) == DOCS


def test_parquet_null_is_an_empty_document(tmp_path):
    path = tmp_path / "n.parquet"
    pq.write_table(pa.table({"text": ["a", None, "b"]}), path)
    assert docs_of(path) == ["a", "", "b"]


def test_text_file_is_chunked_at_line_ends_with_universal_newlines(tmp_path):
    lines = [f"line {i} " + "x" * (i % 50) for i in range(3000)]
    path = tmp_path / "big.raw"
    path.write_bytes("".join(l + "\r\n" for l in lines).encode())  # CRLF, like wiki.test.raw
    chunks = docs_of(path, cfg=dict(chunk_bytes=4096))
    assert len(chunks) > 10
    assert all(c.endswith("\n") and len(c) <= 4096 + 60 for c in chunks)  # + at most the rest of a line
    assert "".join(chunks) == "".join(l + "\n" for l in lines)


def test_a_modest_text_file_still_splits_over_ranks(tmp_path):
    path = _text(tmp_path / "small.txt", [f"sentence {i} of a forty kilobyte file" for i in range(1000)])
    shares = [docs_of(path, rank=r, world_size=4) for r in range(4)]  # default chunk_bytes (1 MiB)
    everything = docs_of(path)
    assert all(shares) and shares == [everything[r::4] for r in range(4)] and "".join(everything) == path.read_text()
    assert sources.text_piece_size(40_000, 1 << 20) == 4096  # ~10 documents, not one
    assert sources.text_piece_size(2 << 20, 1 << 20) == (2 << 20) // 64  # at least 64 documents
    assert sources.text_piece_size(1 << 30, 1 << 20) == 1 << 20  # never more than chunk_bytes


def test_a_line_longer_than_a_chunk_is_cut_so_memory_stays_bounded(tmp_path):
    path = tmp_path / "one-line.txt"
    path.write_text("y" * 10_000)
    chunks = list(sources.read_text_chunks(path, chunk_bytes=1000))
    assert max(map(len, chunks)) <= 2000 and "".join(chunks) == "y" * 10_000


def test_text_is_streamed_lazily(tmp_path):
    # the bad bytes at the end are only met when the reader gets there: nothing before was read whole
    path = tmp_path / "bad-tail.txt"
    path.write_bytes(b"good line\n" * 2000 + b"\xff\xfe broken\n")
    chunks = sources.read_text_chunks(path, chunk_bytes=1024)
    assert next(chunks).startswith("good line\n")
    with pytest.raises(DataError, match="bad-tail.txt: not UTF-8"):
        list(chunks)


def test_parquet_is_read_row_group_by_row_group(tmp_path, monkeypatch):
    path = _parquet(tmp_path / "b.parquet", DOCS, row_group_size=4)  # 6 row groups: 4,4,4,4,4,3
    monkeypatch.setattr(sources, "PARQUET_BATCH_ROWS", 3)
    calls, batches = [], []
    real = pq.ParquetFile.iter_batches

    def spy(self, *a, **k):
        calls.append((tuple(k["row_groups"]), tuple(k["columns"])))
        for batch in real(self, *a, **k):
            batches.append(batch.num_rows)
            yield batch

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", spy)
    monkeypatch.setattr(pq.ParquetFile, "read", lambda *a, **k: pytest.fail("whole-file read"))
    docs = iter_documents(DatasetConfig(source=str(path)))
    assert next(docs) == DOCS[0] and calls == [((0,), ("text",))]  # only the first row group is open
    assert list(docs) == DOCS[1:]
    assert [c[0] for c in calls] == [(g,) for g in range(6)] and max(batches) <= 3 and sum(batches) == 23

    calls.clear()
    assert docs_of(path, start=13) == DOCS[13:]  # rows 0..11 are skipped from the metadata, never read
    assert [c[0] for c in calls] == [(3,), (4,), (5,)]


def test_jsonl_is_parsed_block_by_block(tmp_path, monkeypatch):
    import pyarrow.json as pj

    path = _jsonl(tmp_path / "a.jsonl", DOCS * 4)
    monkeypatch.setattr(sources, "JSON_BLOCK_BYTES", 1024)
    batches, real = [], pj.open_json

    def spy(*a, **k):
        assert k["read_options"].block_size == 1024
        for batch in real(*a, **k):
            batches.append(batch.num_rows)
            yield batch

    monkeypatch.setattr(pj, "open_json", spy)
    docs = iter_documents(DatasetConfig(source=str(path)))
    assert next(docs) == DOCS[0] and len(batches) == 1 and batches[0] < 30  # one block parsed so far
    assert list(docs) == (DOCS * 4)[1:] and len(batches) > 4 and sum(batches) == 92


def test_jsonl_records_larger_than_a_block_fall_back_to_lines(tmp_path, monkeypatch):
    long_docs = DOCS[:5] + ["z" * 5000] + DOCS[5:]
    path = _jsonl(tmp_path / "long.jsonl", long_docs)
    monkeypatch.setattr(sources, "JSON_BLOCK_BYTES", 512)
    assert docs_of(path) == long_docs
    assert docs_of(path, start=4) == long_docs[4:]
    assert docs_of(path, start=7, world_size=2, rank=1) == long_docs[1::2][7:]


def test_folder_reads_supported_files_sorted(tmp_path):
    _text(tmp_path / "c.txt", ["plain text"])
    _parquet(tmp_path / "b.parquet", DOCS[:4])
    sub = tmp_path / "a"
    sub.mkdir()
    _jsonl(sub / "x.jsonl", DOCS[4:8])
    (tmp_path / "README.html").write_text("<p>not data</p>")
    (tmp_path / ".hidden.txt").write_text("hidden")
    assert docs_of(tmp_path) == DOCS[4:8] + DOCS[:4] + ["plain text\n"]
    assert docs_of(tmp_path, start=5) == DOCS[1:4] + ["plain text\n"]  # skips carry over file boundaries
    assert docs_of(tmp_path, start=8) == ["plain text\n"]


def test_builtin_python_docs_splits():
    from pydoc_data.topics import topics

    train, evaluation = docs_of("builtin:python-docs"), docs_of("builtin:python-docs", cfg=dict(split="eval"))
    unique = []  # the topics' texts in sorted-key order, each once ('if' and 'else' share one)
    for key in sorted(topics):
        if topics[key] not in unique:
            unique.append(topics[key])
    assert evaluation == unique[::10] and len(evaluation) == 8
    assert train == [t for t in unique if t not in evaluation]
    assert len(train) + len(evaluation) == len(set(topics.values())) and not set(train) & set(evaluation)
    assert docs_of("builtin:python-docs", cfg=dict(split="train")) == train and " the " in train[0]
    assert list(iter_documents(DatasetConfig())) == train  # the default source


# -- sharding -----------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "text", "folder", "builtin"])
def test_rank_shares_are_disjoint_complete_and_skippable(tmp_path, fmt):
    if fmt == "jsonl":
        source = _jsonl(tmp_path / "a.jsonl", DOCS)
    elif fmt == "parquet":
        source = _parquet(tmp_path / "a.parquet", DOCS, row_group_size=4)
    elif fmt == "text":
        source = _text(tmp_path / "a.txt", [d * 3 for d in DOCS])
    elif fmt == "folder":
        _parquet(tmp_path / "a.parquet", DOCS[:10], row_group_size=3)
        _jsonl(tmp_path / "b.jsonl", DOCS[10:])
        source = tmp_path
    else:
        source = "builtin:python-docs"
    cfg = dict(chunk_bytes=100)
    everything = docs_of(source, cfg=cfg)
    assert len(everything) >= 20
    for world in (2, 3):
        shares = [docs_of(source, cfg=cfg, rank=r, world_size=world) for r in range(world)]
        assert shares == [everything[r::world] for r in range(world)]  # document i -> rank i % world
        for start in (0, 1, 4, len(shares[1]), len(shares[1]) + 3):
            assert docs_of(source, cfg=cfg, rank=1, world_size=world, start=start) == shares[1][start:]


# -- hf -----------------------------------------------------------------------------------------

@pytest.fixture
def offline_hf(tmp_path, monkeypatch):
    pytest.importorskip("datasets")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.mark.parametrize("kind", ["parquet", "jsonl"])
def test_hf_datasets_on_local_files(tmp_path, offline_hf, kind):
    folder = tmp_path / "ds"
    folder.mkdir()
    if kind == "parquet":
        _parquet(folder / "train.parquet", DOCS)
    else:
        (folder / "train.jsonl").write_text("".join(json.dumps({"text": d, "n": i}) + "\n" for i, d in enumerate(DOCS)))
    source = f"hf:{folder}"
    assert docs_of(source, cfg=dict(split="train")) == DOCS
    assert docs_of(source, rank=1, world_size=3, start=2) == DOCS[1::3][2:]
    with pytest.raises(DataError, match="no field 'body'"):
        docs_of(source, cfg=dict(text_field="body"))
    with pytest.raises(DataError, match="could not open the Hugging Face dataset"):
        docs_of(source, cfg=dict(split="nosuchsplit"))


def test_hf_without_datasets_names_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(DataError, match="pip install datasets"):
        docs_of("hf:Salesforce/wikitext")


# -- errors -------------------------------------------------------------------------------------

def test_bad_sources(tmp_path):
    cases = [
        (dict(source=str(tmp_path / "nowhere.txt")), "nowhere.txt.*does not exist"),
        (dict(source="builtin:wiki"), "unknown builtin corpus 'builtin:wiki'"),
        (dict(source="builtin:python-docs", split="test"), "splits"),
        (dict(source="hf:"), "names no dataset"),
        (dict(source=str(tmp_path)), "holds no .txt"),  # an empty folder
    ]
    for cfg, message in cases:
        with pytest.raises(DataError, match=message):
            list(iter_documents(DatasetConfig(**cfg)))


def test_bad_files(tmp_path):
    def fails(path, message, **cfg):
        with pytest.raises(DataError, match=message):
            docs_of(path, cfg=cfg)

    (tmp_path / "x.csv").write_text("a,b\n")
    fails(tmp_path / "x.csv", "x.csv: cannot tell the format from the extension '.csv'")
    fails(_jsonl(tmp_path / "k.jsonl", DOCS, key="body"), "k.jsonl: record 0 .* no string under the key 'text'")
    fails(tmp_path / "k.jsonl", "k.jsonl: not JSON Lines with a string under .meta.", text_field="meta")  # not a string
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\nnot json\n')
    fails(tmp_path / "bad.jsonl", "bad.jsonl: not JSON Lines")
    fails(_parquet(tmp_path / "c.parquet", DOCS, column="body"), "c.parquet: no column 'text'")
    fails(tmp_path / "c.parquet", "column 'id' holds int64, not text", text_field="id")
    (tmp_path / "junk.parquet").write_bytes(b"not parquet at all")
    fails(tmp_path / "junk.parquet", "junk.parquet: not a readable Parquet file")
    for name in ("empty.txt", "empty.jsonl"):
        (tmp_path / name).write_text("")
        fails(tmp_path / name, "holds no documents")
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), tmp_path / "empty.parquet")
    fails(tmp_path / "empty.parquet", "holds no documents")
    with pytest.raises(DataError, match="holds no documents"):  # also for a rank that skips ahead
        docs_of(tmp_path / "empty.txt", rank=2, world_size=3)
    with pytest.raises(ValueError, match="outside world size"):
        docs_of(tmp_path / "c.parquet", rank=3, world_size=3)
