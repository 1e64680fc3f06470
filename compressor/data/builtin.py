"""The offline default corpus: CPython's own documentation topics (``pydoc_data.topics``).

It ships with every CPython installation (79 topics, about 465k characters of English prose with
code) and needs no download, so the quickstart runs on a machine without network access. Topics
are split deterministically: in sorted-key order every 10th topic (positions 9, 19, 29, ...) is the
``eval`` split, the rest is ``train``.
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
    keys = sorted(topics)
    want_eval = split == "eval"
    return [topics[k] for i, k in enumerate(keys) if (i % EVAL_EVERY == EVAL_EVERY - 1) == want_eval]


BUILTIN = {"builtin:python-docs": python_docs}
