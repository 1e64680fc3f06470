"""The real training corpus of `make corpus`: every source in both splits, the held-out part fixed and disjoint."""

from __future__ import annotations

import hashlib
import math

import pytest

from compressor.data import DatasetConfig, WindowStream
from compressor.data.corpus import MANIFEST, corpus_root
from compressor.data.corpus.build import HELDOUT_EVERY, read_manifest

pytestmark = pytest.mark.corpus

# Units per source after dropping repeats (news: 3,824 articles less galleries and repeats).
UNITS = {"brown": 500, "gutenberg": 566, "news": 3759, "sotu": 233}


@pytest.fixture(scope="module")
def manifest() -> dict:
    if not (corpus_root() / MANIFEST).is_file():
        pytest.skip(f"the training corpus is not built in {corpus_root()}; run `make corpus`")
    return read_manifest()


def test_every_source_is_in_both_splits_with_the_fixed_heldout_share(manifest):
    splits = manifest["splits"]
    for source, units in UNITS.items():
        held = splits["heldout"]["sources"][source]["documents"]
        train = splits["train"]["sources"][source]["documents"]
        assert (held, held + train) == (math.ceil(units / HELDOUT_EVERY), units), source
    assert sum(s["characters"] for s in splits["train"]["sources"].values()) > 38_000_000


def test_heldout_text_never_appears_in_training_text(manifest):
    import pyarrow.parquet as pq

    def digests(split: str) -> set[bytes]:
        out = set()
        for info in manifest["splits"][split]["files"]:
            for text in pq.read_table(corpus_root() / split / info["file"], columns=["text"]).column("text").to_pylist():
                out.add(hashlib.blake2b(text.encode(), digest_size=16).digest())
        return out

    assert not digests("train") & digests("heldout")


def test_training_windows_stream_from_the_corpus(manifest, smollm_dir):
    from transformers import AutoTokenizer

    stream = WindowStream(DatasetConfig(source="corpus:train"), AutoTokenizer.from_pretrained(smollm_dir), 512)
    batch = stream.next_batch(4)
    assert batch.shape == (4, 512) and stream.docs >= 1
