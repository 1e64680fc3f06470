"""The offline default corpus: CPython's own documentation topics (``pydoc_data.topics``).

It ships with every CPython installation, is real English prose with code, and needs no download,
so the quickstart runs on a machine without network access. Topics are split deterministically:
every 4th in sorted order is the ``eval`` split (about 15% of the text), the rest is ``train``.
"""

from __future__ import annotations

from typing import Iterator

from compressor.errors import DataError

SPLITS = ("train", "eval")


def python_docs(split: str = "train") -> Iterator[str]:
    if split not in SPLITS:
        raise DataError(f"builtin:python-docs has splits {SPLITS}, not {split!r}")
    try:
        from pydoc_data.topics import topics
    except ImportError as exc:  # some distributions strip pydoc_data
        raise DataError(
            "this Python installation has no pydoc_data module, which holds the builtin corpus; "
            "give a text/JSONL/Parquet file as the data source instead"
        ) from exc
    for i, key in enumerate(sorted(topics)):
        if (i % 4 == 3) == (split == "eval"):
            yield topics[key]


BUILTIN = {"builtin:python-docs": python_docs}
