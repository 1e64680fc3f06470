"""Data sources stream in bounded pieces, shard disjointly, and windows follow BENCHMARK.md exactly."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from compressor.data import DatasetConfig, WindowStream, calibration_windows, eval_windows, iter_documents, load_token_ids
from compressor.data import sources
from compressor.errors import DataError


@pytest.fixture(scope="module")
def tokenizer(smollm_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm_dir)


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("COMPRESSOR_CACHE", str(tmp_path / "cache"))


DOCS = [f"Document number {i} talks about topic {i % 7}." for i in range(23)]


def _parquet(path, docs, row_group_size=5, column="text"):
    pq.write_table(pa.table({column: docs, "id": list(range(len(docs)))}), path, row_group_size=row_group_size)
    return path


def test_every_format_yields_the_documents(tmp_path):
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in DOCS) + "\n")
    _parquet(tmp_path / "b.parquet", DOCS)
    for name in ("a.jsonl", "b.parquet"):
        assert list(iter_documents(DatasetConfig(source=str(tmp_path / name)))) == DOCS
    (tmp_path / "c.txt").write_text("\n".join(DOCS))
    assert "".join(iter_documents(DatasetConfig(source=str(tmp_path / "c.txt")))) == "\n".join(DOCS)
    folder = list(iter_documents(DatasetConfig(source=str(tmp_path))))  # sorted: a.jsonl, b.parquet, c.txt
    assert folder[:46] == DOCS + DOCS and len(folder) == 47


def test_parquet_is_read_one_row_group_at_a_time(tmp_path, monkeypatch):
    path = _parquet(tmp_path / "b.parquet", DOCS, row_group_size=4)
    seen = []
    real = pq.ParquetFile.read_row_group

    def spy(self, i, *a, **k):
        table = real(self, i, *a, **k)
        seen.append(table.num_rows)
        return table

    monkeypatch.setattr(pq.ParquetFile, "read_row_group", spy)
    docs = iter_documents(DatasetConfig(source=str(path)))
    assert next(docs) == DOCS[0] and seen == [4]  # only the first row group has been read
    assert list(docs) == DOCS[1:] and max(seen) == 4 and len(seen) == 6


def test_text_is_read_in_bounded_chunks_at_line_ends(tmp_path):
    path = tmp_path / "big.txt"
    lines = [f"line {i} " + "x" * (i % 50) for i in range(5000)]
    path.write_text("\n".join(lines) + "\n")
    chunks = list(sources.read_text_chunks(path, chunk_bytes=4096))
    assert len(chunks) > 10 and max(len(c) for c in chunks) < 4096 + 100
    assert all(c.endswith("\n") for c in chunks)
    assert "".join(chunks) == path.read_text()


def test_ranks_get_disjoint_complete_shares(tmp_path):
    cfg = DatasetConfig(source=str(_parquet(tmp_path / "b.parquet", DOCS)))
    shares = [list(iter_documents(cfg, rank=r, world_size=3)) for r in range(3)]
    assert sorted(sum(shares, [])) == sorted(DOCS)
    assert shares[1] == DOCS[1::3]
    assert list(iter_documents(cfg, rank=1, world_size=3, start=2)) == DOCS[1::3][2:]


def test_builtin_corpus_splits_are_disjoint_real_text():
    train = list(iter_documents(DatasetConfig()))
    evaluation = list(iter_documents(DatasetConfig(split="eval")))
    assert len(train) > 3 * len(evaluation) > 0
    assert not set(train) & set(evaluation)
    assert sum(map(len, train)) > 300_000 and " the " in train[0]


def test_hf_datasets_path_on_local_files(tmp_path, monkeypatch):
    pytest.importorskip("datasets")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    folder = tmp_path / "ds"
    folder.mkdir()
    _parquet(folder / "train.parquet", DOCS)
    got = list(iter_documents(DatasetConfig(source=f"hf:{folder}", split="train")))
    assert got == DOCS


@pytest.mark.parametrize(
    "cfg, message",
    [
        (dict(source="nowhere.txt"), "neither a file"),
        (dict(source="builtin:wiki"), "unknown builtin"),
        (dict(source="builtin:python-docs", split="test"), "splits"),
    ],
)
def test_bad_sources(cfg, message):
    with pytest.raises(DataError, match=message):
        list(iter_documents(DatasetConfig(**cfg)))


def test_bad_files(tmp_path):
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="extension"):
        list(iter_documents(DatasetConfig(source=str(tmp_path / "x.csv"))))
    (tmp_path / "x.jsonl").write_text('{"body": "hi"}\n')
    with pytest.raises(DataError, match="text_field"):
        list(iter_documents(DatasetConfig(source=str(tmp_path / "x.jsonl"))))
    _parquet(tmp_path / "x.parquet", DOCS, column="body")
    with pytest.raises(DataError, match="no column 'text'"):
        list(iter_documents(DatasetConfig(source=str(tmp_path / "x.parquet"))))
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(DataError, match="no documents"):
        list(iter_documents(DatasetConfig(source=str(tmp_path / "empty.txt"))))


def test_benchmark_windows_on_wikitext(tokenizer, wikitext_dir):
    test_ids = load_token_ids(wikitext_dir / "wiki.test.raw", tokenizer)
    assert test_ids.numel() == 301_948
    windows = eval_windows(test_ids, 512)
    assert windows.shape == (589, 512) and torch.equal(windows[1], test_ids[512:1024])
    assert eval_windows(test_ids, 512, limit=64).shape == (64, 512)

    valid_ids = load_token_ids(wikitext_dir / "wiki.valid.tokens", tokenizer)
    assert valid_ids.numel() == 273_868
    # the protocol, written out independently
    text = (wikitext_dir / "wiki.valid.tokens").read_text()
    ids = torch.tensor(tokenizer(text, add_special_tokens=False).input_ids)
    g = torch.Generator()
    g.manual_seed(0)
    expected = []
    for _ in range(128):
        i = torch.randint(0, ids.numel() - 512 - 1, (1,), generator=g).item()
        expected.append(ids[i : i + 512])
    assert torch.equal(calibration_windows(valid_ids, 128, 512, seed=0), torch.stack(expected))


def test_token_cache_is_used_and_invalidated(tmp_path, tokenizer, monkeypatch):
    path = tmp_path / "t.txt"
    path.write_text("Hello world. " * 50)
    first = load_token_ids(path, tokenizer)
    calls = []
    monkeypatch.setattr("compressor.data.tokens._tokenize", lambda *a: calls.append(a) or torch.tensor([1]))
    assert torch.equal(load_token_ids(path, tokenizer), first) and not calls  # from the cache
    path.write_text("Something else entirely. " * 50)
    load_token_ids(path, tokenizer)
    assert len(calls) == 1  # the file changed: tokenized again


def test_short_text_is_a_clear_error(tokenizer):
    ids = torch.arange(100)
    with pytest.raises(DataError, match="too few"):
        calibration_windows(ids, 4, 512)
    with pytest.raises(DataError, match="too few"):
        eval_windows(ids, 512)


@pytest.mark.parametrize("shuffle", [0, 8])
def test_window_stream_resumes_exactly(tmp_path, tokenizer, shuffle):
    cfg = DatasetConfig(source=str(_parquet(tmp_path / "b.parquet", DOCS * 3)))
    stream = WindowStream(cfg, tokenizer, 16, rank=1, world_size=2, seed=5, shuffle_buffer=shuffle)
    for _ in range(7):
        next(stream)
    state = stream.state_dict()
    expected = stream.next_batch(40)  # runs past the end of the corpus into the next epoch
    assert stream.epoch >= 1

    resumed = WindowStream(cfg, tokenizer, 16, rank=1, world_size=2, seed=5, shuffle_buffer=shuffle)
    resumed.load_state_dict(state)
    assert torch.equal(resumed.next_batch(40), expected)
    with pytest.raises(DataError, match="rank"):
        WindowStream(cfg, tokenizer, 16, rank=0, world_size=2).load_state_dict(state)


def test_window_stream_packs_documents_with_eos(tmp_path, tokenizer):
    cfg = DatasetConfig(source=str(_parquet(tmp_path / "b.parquet", DOCS)))
    stream = WindowStream(cfg, tokenizer, 32)
    flat = torch.cat([next(stream) for _ in range(5)])
    expected = []
    for doc in DOCS:
        expected += tokenizer(doc, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    assert flat.tolist() == expected[: flat.numel()]
