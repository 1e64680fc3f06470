"""The offline default corpus: CPython's own documentation topics (``pydoc_data.topics``).

It ships with every CPython installation (79 topics, about 465k characters of English prose with
code) and needs no download, so the quickstart runs on a machine without network access. Topics
are split deterministically: in sorted-key order every 10th topic (``[::10]``: 8 topics, about 27k
characters) is the ``eval`` split, the rest is ``train``. A text filed under two keys (``if`` and
``else`` share one) counts once, at its first key, so that no text is in both splits.
"""

from __future__ import annotations

from compressor.errors import DataError

SPLITS = ("train", "eval")
EVAL_EVERY = 10


def python_docs(split: str = "train") -> list[str]:
    """The topics of one split, in sorted-key order."""
    if split not in SPLITS:
        raise DataError(f"builtin:python-docs has the splits {SPLITS}, not {split!r}; set split to one of them")
    try:
        from pydoc_data.topics import topics
    except ImportError as exc:  # some Linux distributions strip pydoc_data
        raise DataError(
            "this Python installation has no pydoc_data module, which holds the builtin corpus; "
            "give a text/JSONL/Parquet file as the data source instead"
        ) from exc
    unique = list(dict.fromkeys(topics[k] for k in sorted(topics)))
    return unique[::EVAL_EVERY] if split == "eval" else [t for i, t in enumerate(unique) if i % EVAL_EVERY]


BUILTIN = {"builtin:python-docs": python_docs}
