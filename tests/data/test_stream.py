"""The training stream packs documents exactly, shards by rank, stays bounded and resumes bit for bit."""

import io

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from compressor.data import DatasetConfig, WindowStream, iter_documents
from compressor.errors import DataError

DOCS = [f"doc {i}: " + "word " * (i % 9) for i in range(29)] + [""]  # varied lengths, one empty


class CharTokenizer:
    """One token per character (code point + 1); EOS is 0."""

    def __init__(self, eos=0):
        self.eos_token_id = eos

    def __call__(self, text, add_special_tokens=True):
        assert add_special_tokens is False
        return {"input_ids": [ord(c) + 1 for c in text]}


def _cfg(tmp_path, docs=DOCS, row_group_size=4):
    path = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"text": docs}), path, row_group_size=row_group_size)
    return DatasetConfig(source=str(path))


def reference_windows(cfg, tokenizer, seq_len, count, rank=0, world_size=1):
    """The first ``count`` windows, from this rank's documents joined with EOS, epoch after epoch."""
    epoch = []
    for doc in iter_documents(cfg, rank=rank, world_size=world_size):
        ids = tokenizer(doc, add_special_tokens=False)["input_ids"]
        if ids:
            epoch += ids + [tokenizer.eos_token_id]
    flat = epoch * (count * seq_len // len(epoch) + 1)
    return torch.tensor(flat[: count * seq_len]).view(count, seq_len)


def test_windows_pack_documents_with_eos_over_epochs(tmp_path):
    cfg, tok = _cfg(tmp_path), CharTokenizer()
    stream = WindowStream(cfg, tok, 7)
    expected = reference_windows(cfg, tok, 7, 200)
    got = stream.next_batch(200)
    assert got.dtype == torch.long and got.shape == (200, 7)
    assert torch.equal(got, expected)
    epoch_tokens = sum(len(d) + 1 for d in DOCS if d)
    assert stream.epoch == 200 * 7 // epoch_tokens  # the counter follows the passes over the corpus


def test_ranks_read_disjoint_documents(tmp_path):
    cfg, tok = _cfg(tmp_path), CharTokenizer()
    for rank in range(3):
        stream = WindowStream(cfg, tok, 5, rank=rank, world_size=3)
        assert torch.equal(stream.next_batch(60), reference_windows(cfg, tok, 5, 60, rank, 3))
    # the shares themselves are disjoint and complete (see test_sources), so the streams are too
    seen = [list(iter_documents(cfg, rank=r, world_size=3)) for r in range(3)]
    assert sorted(sum(seen, [])) == sorted(DOCS)


def test_shuffle_buffer_permutes_windows_reproducibly(tmp_path):
    cfg, tok = _cfg(tmp_path), CharTokenizer()
    plain = [tuple(w.tolist()) for w in reference_windows(cfg, tok, 6, 80)]
    a = WindowStream(cfg, tok, 6, shuffle_buffer=8, seed=1).next_batch(60)
    b = WindowStream(cfg, tok, 6, shuffle_buffer=8, seed=1).next_batch(60)
    c = WindowStream(cfg, tok, 6, shuffle_buffer=8, seed=2).next_batch(60)
    assert torch.equal(a, b) and not torch.equal(a, c)
    got = [tuple(w.tolist()) for w in a]
    assert got != plain[:60]
    remaining = list(plain[:68])  # the buffer draws from at most 8 windows ahead
    for w in got:
        remaining.remove(w)  # each window comes out once


@pytest.mark.parametrize("shuffle, world_size", [(0, 1), (0, 2), (5, 2)])
@pytest.mark.parametrize("cut", [0, 3, 11, 40])
def test_resume_is_bit_exact(tmp_path, shuffle, world_size, cut):
    cfg, tok = _cfg(tmp_path), CharTokenizer()
    make = lambda: WindowStream(cfg, tok, 9, rank=world_size - 1, world_size=world_size, seed=7, shuffle_buffer=shuffle)
    stream = make()
    stream.next_batch(cut) if cut else None
    buffer = io.BytesIO()
    torch.save(stream.state_dict(), buffer)  # as a checkpoint would
    expected = stream.next_batch(150)  # runs into later epochs
    assert stream.epoch >= 1

    resumed = make()
    buffer.seek(0)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    assert torch.equal(resumed.next_batch(150), expected)
    assert (resumed.epoch, resumed.docs) == (stream.epoch, stream.docs)


def test_resume_mid_document_keeps_the_leftover(tmp_path):
    long_docs = ["x" * 100, "y" * 100, "z" * 30]
    cfg, tok = _cfg(tmp_path, long_docs, row_group_size=1), CharTokenizer()
    stream = WindowStream(cfg, tok, 16)
    stream.next_batch(3)
    state = stream.state_dict()
    assert state["docs"] == 1 and state["carry"].numel() == 101 - 48  # the rest of the first document
    resumed = WindowStream(cfg, tok, 16)
    resumed.load_state_dict(state)
    assert torch.equal(resumed.next_batch(30), stream.next_batch(30))


def test_memory_stays_bounded_on_a_big_text(tmp_path):
    path = tmp_path / "big.txt"
    path.write_text("".join(f"line {i} " + "abc " * (i % 13) + "\n" for i in range(20_000)))  # ~700 KB
    stream = WindowStream(DatasetConfig(source=str(path), chunk_bytes=2000), CharTokenizer(), 64, shuffle_buffer=4)
    peak = 0
    for _ in range(3000):
        next(stream)
        peak = max(peak, stream._tokens.numel())
    assert peak <= 2000 + 60 + 1 + 64  # one chunk (+ the rest of its line), EOS, and a window's leftover
    assert len(stream._pool) == 4


def test_stream_errors(tmp_path):
    cfg, tok = _cfg(tmp_path, ["a", "b", "c"]), CharTokenizer()
    with pytest.raises(DataError, match="rank 3 of 4 gets no text"):
        next(WindowStream(cfg, tok, 4, rank=3, world_size=4))
    with pytest.raises(DataError, match="rank 0 of 1 gets no text"):
        next(WindowStream(_cfg(tmp_path, ["", ""]), tok, 4))
    with pytest.raises(DataError, match="no EOS token"):
        WindowStream(cfg, CharTokenizer(eos=None), 4)
    state = WindowStream(cfg, tok, 4, rank=1, world_size=2).state_dict()
    with pytest.raises(DataError, match="saved with rank=1, now 0"):
        WindowStream(cfg, tok, 4, rank=0, world_size=2).load_state_dict(state)
    with pytest.raises(DataError, match="saved with seq_len=4, now 8"):
        WindowStream(cfg, tok, 8, rank=1, world_size=2).load_state_dict(state)
    with pytest.raises(ValueError, match="outside world size"):
        WindowStream(cfg, tok, 4, rank=2, world_size=2)


def test_real_tokenizer_on_the_builtin_corpus(smollm_dir):
    from tests.data.test_tokens import load_tokenizer

    tok = load_tokenizer(smollm_dir)
    cfg = DatasetConfig(split="eval")
    stream = WindowStream(cfg, tok, 128, rank=1, world_size=2)
    assert torch.equal(stream.next_batch(40), reference_windows(cfg, tok, 128, 40, 1, 2))
