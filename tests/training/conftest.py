"""Fixtures of the 2-rank DeepSpeed tests."""

import pytest


@pytest.fixture(scope="module")
def text(tmp_path_factory, wikitext_dir):
    """The first 60k characters of wiki.valid.tokens: a few steps of training text for the tiny models."""
    path = tmp_path_factory.mktemp("text") / "text.txt"
    path.write_text((wikitext_dir / "wiki.valid.tokens").read_text()[:60_000])
    return path
