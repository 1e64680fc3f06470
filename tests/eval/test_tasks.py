"""Task names: suites, hub tasks, and clear errors for unknown or clashing names, at config load."""

import pytest

from compressor.config.base import load_config
from compressor.errors import ConfigError
from compressor.eval.config import EvalConfig
from compressor.eval.tasks import SUITES, TASKS, resolve_tasks
from compressor.runs.evaluate import EvalRunConfig
from compressor.runs.prune import PruneConfig
from compressor.training.config import LearnConfig


def test_suites_expand_in_order_without_duplicates():
    specs = resolve_tasks(["perplexity", "zero_shot", "piqa", "knowledge"])
    names = [s.name for s in specs]
    assert names == ["perplexity", *SUITES["zero_shot"], *SUITES["knowledge"]]
    assert all(s.offline for s in specs)


def test_hub_tasks_are_any_stock_harness_task():
    (spec,) = resolve_tasks(["hf:arc_easy"])
    assert (spec.harness, spec.result, spec.offline) == ("arc_easy", "arc_easy", False)


@pytest.mark.parametrize("tasks, message", [
    (["piqq"], "unknown task 'piqq'; known tasks: perplexity, piqa"),
    (["hf:"], "names no harness task"),
    (["piqa", "hf:piqa"], "both run the harness task 'piqa'"),
])
def test_bad_task_names_fail_at_load_naming_the_field(tmp_path, tasks, message):
    path = tmp_path / "c.yaml"
    path.write_text(f"evaluation: {{tasks: {tasks}}}\n")
    for cls in (PruneConfig, LearnConfig, EvalRunConfig):
        with pytest.raises(ConfigError, match="`evaluation.tasks`") as err:
            load_config(cls, path)
        assert message in str(err.value)


def test_perplexity_is_one_task_among_others():
    assert EvalConfig().perplexity and not EvalConfig().harness_specs
    cfg = EvalConfig(tasks=["piqa", "mmlu"])
    assert not cfg.perplexity and [s.result for s in cfg.harness_specs] == ["piqa", "mmlu"]
    assert not EvalConfig(tasks=["piqa"], enabled=False).harness_specs
    with pytest.raises(ValueError):
        EvalConfig(tasks=[])


def test_every_offline_task_names_its_stock_folder():
    import lm_eval.tasks
    from pathlib import Path

    stock = Path(lm_eval.tasks.__file__).parent
    for spec in TASKS.values():
        assert all((stock / d).is_dir() for d in spec.stock_dirs), spec.name
