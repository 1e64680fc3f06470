"""Token ids follow the benchmark protocol, are cached on disk correctly, and windows are exact."""

import functools
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from compressor.data import DatasetConfig, calibration_windows, eval_windows, load_token_ids, tokens
from compressor.errors import DataError


class CharTokenizer:
    """One token per character (its code point + shift); EOS is 0. Fast and easy to reason about."""

    backend_tokenizer = None

    def __init__(self, shift: int = 1, eos: int | None = 0):
        self.shift, self.eos_token_id = shift, eos

    def __call__(self, text, add_special_tokens=True):
        assert add_special_tokens is False
        return {"input_ids": [ord(c) + self.shift for c in text]}

    def get_vocab(self):
        return {"shift": self.shift}


def chars(text, shift=1):
    return [ord(c) + shift for c in text]


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("COMPRESSOR_CACHE", str(tmp_path / "cache"))


def cache_files(tmp_path):
    folder = tmp_path / "cache" / "tokens"
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


# -- the protocol on the real data --------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def load_tokenizer(folder):
    """Loaded once per test process (it takes seconds), also for test_stream."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


@pytest.fixture
def smollm_tokenizer(smollm_dir):
    return load_tokenizer(smollm_dir)


def test_benchmark_windows_on_wikitext(smollm_tokenizer, wikitext_dir):
    tok = smollm_tokenizer
    test_ids = load_token_ids(wikitext_dir / "wiki.test.raw", tok)  # CRLF file, read with universal newlines
    assert test_ids.dtype == torch.long and test_ids.shape == (301_948,)
    windows = eval_windows(test_ids, 512)
    assert windows.shape == (589, 512) and torch.equal(windows[7], test_ids[7 * 512 : 8 * 512])
    assert torch.equal(eval_windows(test_ids, 512, limit=64), windows[:64])

    valid_ids = load_token_ids(DatasetConfig(source=str(wikitext_dir / "wiki.valid.tokens")), tok)
    # the protocol, written out independently
    with open(wikitext_dir / "wiki.valid.tokens", encoding="utf-8") as fh:
        ids = torch.tensor(tok(fh.read(), add_special_tokens=False).input_ids)
    assert torch.equal(valid_ids, ids) and ids.numel() == 273_868
    g = torch.Generator()
    g.manual_seed(0)
    expected = []
    for _ in range(128):
        i = torch.randint(0, ids.numel() - 512 - 1, (1,), generator=g).item()
        expected.append(ids[i : i + 512])
    got = calibration_windows(valid_ids, 128, 512, seed=0)
    assert got.dtype == torch.long and torch.equal(got, torch.stack(expected))
    assert not torch.equal(calibration_windows(valid_ids, 128, 512, seed=1), got)


# -- what is tokenized how ----------------------------------------------------------------------

def test_text_file_is_one_string_without_eos(tmp_path, monkeypatch):
    path = tmp_path / "t.raw"
    path.write_bytes(b"first line\r\nsecond line\r\n")
    assert load_token_ids(path, CharTokenizer()).tolist() == chars("first line\nsecond line\n")
    assert load_token_ids(path, CharTokenizer(), max_tokens=5).tolist() == chars("first")
    # a file too big for one string is tokenized piece by piece; the pieces cover it exactly
    monkeypatch.setattr(tokens, "WHOLE_FILE_LIMIT", 8)
    cfg = DatasetConfig(source=str(path), chunk_bytes=4)
    assert load_token_ids(cfg, CharTokenizer(shift=2)).tolist() == chars("first line\nsecond line\n", 2)


def test_documents_are_joined_with_eos(tmp_path):
    docs = ["alpha", "", "beta gamma", None, "delta"]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": d if d is not None else ""}) + "\n" for d in docs))
    pq.write_table(pa.table({"text": docs}), tmp_path / "b.parquet", row_group_size=2)
    joined = chars("alpha") + [0] + chars("beta gamma") + [0] + chars("delta") + [0]  # empty documents drop out
    for name in ("a.jsonl", "b.parquet"):
        assert load_token_ids(tmp_path / name, CharTokenizer()).tolist() == joined
    (tmp_path / "c.txt").write_text("tail\n")
    # a folder: every document and every text file, each followed by EOS
    assert load_token_ids(tmp_path, CharTokenizer()).tolist() == joined * 2 + chars("tail\n") + [0]
    assert load_token_ids(DatasetConfig(source=str(tmp_path), max_tokens=7), CharTokenizer()).tolist() == joined[:7]
    with pytest.raises(DataError, match="no EOS token"):
        load_token_ids(tmp_path / "a.jsonl", CharTokenizer(eos=None))


def test_builtin_split_token_ids():
    from compressor.data.builtin import python_docs

    got = load_token_ids(DatasetConfig(split="eval"), CharTokenizer())
    expected = [t for doc in python_docs("eval") for t in chars(doc) + [0]]
    assert got.tolist() == expected


# -- the cache ----------------------------------------------------------------------------------

def test_cache_hit_and_invalidation(tmp_path, monkeypatch):
    path = tmp_path / "t.txt"
    path.write_text("Hello world. " * 20)
    first = load_token_ids(path, CharTokenizer())
    assert len(cache_files(tmp_path)) == 1 and cache_files(tmp_path)[0].endswith(".safetensors")  # no temp files left

    calls = []
    real = tokens._tokenize
    monkeypatch.setattr(tokens, "_tokenize", lambda *a: calls.append(a) or real(*a))
    assert torch.equal(load_token_ids(path, CharTokenizer()), first) and not calls  # from the cache

    # same size, same mtime, other content: the key hashes the contents
    stat = path.stat()
    path.write_text("Hullo world. " * 20)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert load_token_ids(path, CharTokenizer()).tolist() == chars("Hullo world. " * 20) and len(calls) == 1
    load_token_ids(path, CharTokenizer(shift=3))  # another tokenizer
    load_token_ids(path, CharTokenizer(), max_tokens=4)  # other options
    load_token_ids(DatasetConfig(source=str(path), text_field="x"), CharTokenizer())
    assert len(calls) == 4 and len(cache_files(tmp_path)) == 5
    load_token_ids(path, CharTokenizer(shift=3))
    assert len(calls) == 4


def test_tokenizer_fingerprint_tracks_the_vocabulary(smollm_tokenizer):
    import copy

    fp = tokens.tokenizer_fingerprint(smollm_tokenizer)
    assert fp == tokens.tokenizer_fingerprint(smollm_tokenizer)
    other = copy.deepcopy(smollm_tokenizer)
    other.add_tokens(["<brand-new-token>"])
    assert tokens.tokenizer_fingerprint(other) != fp


def test_damaged_cache_is_rebuilt(tmp_path, caplog):
    path = tmp_path / "t.txt"
    path.write_text("some text")
    load_token_ids(path, CharTokenizer())
    entry = tmp_path / "cache" / "tokens" / cache_files(tmp_path)[0]
    entry.write_bytes(b"garbage")
    assert load_token_ids(path, CharTokenizer()).tolist() == chars("some text")
    assert "unreadable token cache" in caplog.text
    assert load_file(str(entry))["ids"].tolist() == chars("some text")


def test_builtin_is_cached_and_hf_is_not(tmp_path, monkeypatch):
    load_token_ids(DatasetConfig(split="eval"), CharTokenizer())
    assert len(cache_files(tmp_path)) == 1
    assert tokens._cache_key(DatasetConfig(source="hf:some/dataset"), CharTokenizer(), None) is None


# -- windows ------------------------------------------------------------------------------------

def test_window_shapes_and_limits():
    ids = torch.arange(10 * 16 + 5)
    w = eval_windows(ids, 16)
    assert w.shape == (10, 16) and w.flatten().tolist() == list(range(160))
    assert eval_windows(ids, 16, limit=3).shape == (3, 16) and eval_windows(ids, 16, limit=99).shape == (10, 16)
    assert eval_windows(torch.arange(16), 16).shape == (1, 16)
    c = calibration_windows(ids, 50, 16, seed=3)
    assert c.shape == (50, 16) and all(row.tolist() == list(range(row[0], row[0] + 16)) for row in c)
    assert int(c[:, 0].max()) < ids.numel() - 16 - 1  # starts drawn from [0, n - length - 1)
    assert calibration_windows(torch.arange(18), 2, 16).shape == (2, 16)  # the shortest text that works


def test_short_text_is_a_clear_error():
    with pytest.raises(DataError, match="calibration data: 17 tokens are too few for a window of 16"):
        calibration_windows(torch.arange(17), 4, 16)
    with pytest.raises(DataError, match="evaluation data: 15 tokens are too few"):
        eval_windows(torch.arange(15), 16)


def test_empty_text_is_a_clear_error(tmp_path):
    (tmp_path / "blank.txt").write_text("")
    with pytest.raises(DataError, match="blank.txt' yields no tokens"):
        load_token_ids(tmp_path / "blank.txt", CharTokenizer())
    (tmp_path / "blank.jsonl").write_text('{"text": ""}\n')
    with pytest.raises(DataError, match="yields no tokens"):
        load_token_ids(tmp_path / "blank.jsonl", CharTokenizer())
