"""`compressor search` end to end on a tiny LLaMA (in process): plans at the exact target, resume, bad configs."""

import json
from fractions import Fraction

import pytest
import yaml

from compressor.cli import main
from compressor.config.base import load_config
from compressor.errors import ConfigError
from compressor.models import load_model
from compressor.models.layers import prunable_linears
from compressor.runs.search import run_search
from compressor.search.config import SearchConfig
from compressor.sparsity.plan import PlanError, SparsityPlan, layer_shapes


def _config(tmp_path, model, text, **extra):
    cfg = {
        "model": {"source": str(model)},
        "method": "sparsegpt",
        "levels": {"start": 0.5, "stop": 0.9, "step": 0.1},
        "target": 0.7,
        "calibration": {"data": {"source": str(text)}, "num_windows": 4, "seq_len": 32, "batch_size": 2},
        "fisher": {"num_windows": 2},
        "fitness": {"num_windows": 4, "seq_len": 32, "final_windows": 2, "windows_per_job": 2},
        "evolution": {"generations": 2, "offspring": 3,
                      "stages": [{"tokens": 31, "survivors": 2}, {"tokens": 62, "survivors": 1}]},
        "executor": {"kind": "inprocess"},
        **extra,
    }
    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture
def eval_file(tmp_path, wikitext_dir):
    path = tmp_path / "eval.txt"
    path.write_text((wikitext_dir / "wiki.test.raw").read_text()[:20_000])
    return path


def test_search_writes_plans_at_the_exact_target(tmp_path, tiny_llama_dir, text_file, eval_file, capsys):
    out = tmp_path / "run"
    cfg = _config(tmp_path, tiny_llama_dir, text_file,
                  evaluation={"data": {"source": str(eval_file)}, "seq_len": 32, "max_windows": 2})
    assert main(["search", "--config", str(cfg), "--output", str(out), "--evaluate"]) == 0
    assert "msp-s0: fitness" in capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    assert set(report["searches"]) == {"uniform", "owl", "evopress-s0", "msp-s0"}
    loaded = load_model(str(tiny_llama_dir))
    shapes = layer_shapes(prunable_linears(loaded.model, loaded.arch))
    for key, s in report["searches"].items():
        plan = SparsityPlan.load(out / s["plan"], shapes)  # validated against the model, average included
        assert plan.target == 0.7 and plan.resolve(shapes).average == Fraction(7, 10), key
        assert s["average_exact"] == "7/10" and s["final_fitness"] > 0 and s["perplexity"]["windows"] == 2
    msp, evo = report["searches"]["msp-s0"], report["searches"]["evopress-s0"]
    assert msp["evaluations"] == evo["evaluations"] > 0 and len(msp["history"]) == 2  # the same budget
    owl = report["searches"]["owl"]
    assert 1 <= owl["evaluations"] <= len(owl["grid"]) and len(owl["grid"]) > 1 and owl["chosen"] is not None
    assert report["database"]["solved"] == 14 * 5
    for plot in report["outputs"]["plots"]:
        assert (out / plot).stat().st_size > 1000, plot
    assert {"plots/fitness.png", "plots/fisher.png", "plots/levels-msp-s0.png"} <= set(report["outputs"]["plots"])
    assert "Mixed-sparsity search" in (out / "report.md").read_text()
    sens = json.loads((out / "sensitivity.json").read_text())
    assert set(sens["layers"]) == set(shapes) and all(v > 0 for v in sens["layers"].values())

    assert main(["report", str(out), "--output", str(tmp_path / "page")]) == 0  # the comparison page reads searches
    page = (tmp_path / "page" / "report.md").read_text()
    assert "| run | search sparsegpt 0.7 |" in page and "## Mixed-sparsity searches" in page
    for key, s in report["searches"].items():
        assert f"| run | {key} | {s['final_fitness']:.4g} |" in page, key
    assert (tmp_path / "page" / "perplexity.png").stat().st_size > 1000


def test_a_stopped_search_resumes_to_the_same_plan(tmp_path, tiny_llama_dir, text_file, monkeypatch):
    cfg = load_config(SearchConfig, _config(tmp_path, tiny_llama_dir, text_file, searches=["msp"]),
                      ["evolution.generations=3"])
    calls = []

    def stop_after_two(run, generation):
        calls.append(generation)
        if generation == 2:
            raise KeyboardInterrupt("killed")

    with pytest.raises(KeyboardInterrupt):
        run_search(cfg, tmp_path / "stopped", on_generation=stop_after_two)
    assert calls == [1, 2] and not (tmp_path / "stopped" / "report.json").exists()
    assert (tmp_path / "stopped" / "dense_hidden.safetensors").is_file()
    calls.clear()
    import compressor.runs.search as search

    monkeypatch.setattr(search, "final_hidden", lambda *a, **k: pytest.fail("the dense model ran again"))
    resumed = run_search(cfg, tmp_path / "stopped", resume=True, on_generation=lambda r, g: calls.append(g))
    monkeypatch.undo()
    assert calls == [3]  # generations 1 and 2 came from the checkpoint, the dense states from the run folder
    assert not (tmp_path / "stopped" / "dense_hidden.safetensors").exists()  # work state, gone with the finish
    whole = run_search(cfg, tmp_path / "whole")
    assert ((tmp_path / "stopped" / "plans" / "msp-s0.yaml").read_text()
            == (tmp_path / "whole" / "plans" / "msp-s0.yaml").read_text())
    a, b = resumed["searches"]["msp-s0"], whole["searches"]["msp-s0"]
    assert [h["fitness"] for h in a["history"]] == [h["fitness"] for h in b["history"]]
    assert a["evaluations"] == b["evaluations"] and a["levels"] == b["levels"]


def test_a_resumed_search_may_change_its_generations(tmp_path, tiny_llama_dir, text_file):
    """Stopped after 2 of 5 generations, resumed with 3: the same plan as an uninterrupted 3-generation
    run; resumed with fewer generations than the checkpoint holds: an error naming both."""
    config = _config(tmp_path, tiny_llama_dir, text_file, searches=["msp"])
    long, short = (load_config(SearchConfig, config, [f"evolution.generations={g}"]) for g in (5, 3))

    def stop_after_two(run, generation):
        if generation == 2:
            raise KeyboardInterrupt("killed")

    with pytest.raises(KeyboardInterrupt):
        run_search(long, tmp_path / "stopped", on_generation=stop_after_two)
    with pytest.raises(ConfigError, match="generation 2, past evolution.generations=1; ask for at least 2"):
        run_search(load_config(SearchConfig, config, ["evolution.generations=1"]), tmp_path / "stopped", resume=True)
    resumed = run_search(short, tmp_path / "stopped", resume=True)
    whole = run_search(short, tmp_path / "whole")
    assert ((tmp_path / "stopped" / "plans" / "msp-s0.yaml").read_text()
            == (tmp_path / "whole" / "plans" / "msp-s0.yaml").read_text())
    assert resumed["searches"]["msp-s0"]["evaluations"] == whole["searches"]["msp-s0"]["evaluations"]


def test_target_outside_the_levels_fails_at_load(tmp_path, tiny_llama_dir, text_file):
    cfg = _config(tmp_path, tiny_llama_dir, text_file, target=0.95)
    with pytest.raises(ConfigError, match=r"target 0.95 lies outside the level set .* \[0.5, 0.9\]"):
        load_config(SearchConfig, cfg)
    assert main(["search", "--config", str(cfg), "--output", str(tmp_path / "run")]) == 2
    assert not (tmp_path / "run").exists()


def test_a_level_impossible_for_a_layer_fails_before_any_work(tmp_path, tiny_llama_dir, text_file):
    cfg = load_config(SearchConfig, _config(tmp_path, tiny_llama_dir, text_file, levels=["1:3", "2:3"], target=0.5,
                                                      fisher={"num_windows": 2, "spread": 0.2}))
    with pytest.raises(PlanError, match=r"model\.layers\.0\.self_attn\.q_proj: input width 64 is not divisible by M=3"):
        run_search(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()  # nothing was computed, so nothing is left


@pytest.mark.parametrize("extra, words", [
    ({"evolution": {"stages": [{"tokens": 31, "survivors": 1}, {"tokens": 62, "survivors": 2}]}}, "evolution.stages"),
    ({"evolution": {"stages": [{"tokens": 500, "survivors": 1}]}}, "do not fit in fitness.num_windows"),
    ({"levels": ["2:4", 0.6]}, "levels"),
    ({"levels": [0.5, 0.6, 0.8]}, "equally spaced"),
    ({"searches": ["msp", "msp"]}, "at most once"),
    ({"model": {"lazy": True}}, "model.lazy"),
    ({"method": "obs"}, "unknown one-shot method 'obs'"),
])
def test_bad_search_configs_name_what_is_wrong(tmp_path, tiny_llama_dir, text_file, extra, words):
    cfg = yaml.safe_load(_config(tmp_path, tiny_llama_dir, text_file).read_text())
    cfg.update(extra)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(ConfigError, match=words):
        load_config(SearchConfig, path)


def test_evaluation_on_the_calibration_text_is_refused(tmp_path, tiny_llama_dir, text_file):
    cfg = _config(tmp_path, tiny_llama_dir, text_file, evaluation={"enabled": True, "data": {"source": str(text_file)}})
    with pytest.raises(ConfigError, match="never be scored or tuned on the evaluation text"):
        load_config(SearchConfig, cfg)


def test_a_searched_plan_is_what_prune_applies(tmp_path, tiny_llama_dir, text_file):
    from compressor.config.base import validate_config
    from compressor.runs.prune import PruneConfig, run_prune

    cfg = load_config(SearchConfig, _config(tmp_path, tiny_llama_dir, text_file, searches=["msp"]),
                      ["evolution.generations=1"])
    run_search(cfg, tmp_path / "search")
    plan_path = tmp_path / "search" / "plans" / "msp-s0.yaml"
    prune = validate_config(PruneConfig, {
        "model": {"source": str(tiny_llama_dir)}, "method": "sparsegpt", "sparsity_plan": str(plan_path),
        "calibration": {"data": {"source": str(text_file)}, "num_windows": 4, "seq_len": 32, "batch_size": 2},
        "evaluation": {"enabled": False}, "executor": {"kind": "inprocess"}})
    run_prune(prune, tmp_path / "prune")
    plan = SparsityPlan.load(plan_path)
    pruned = load_model(str(tmp_path / "prune" / "model")).model
    kept = {n: float((pruned.get_submodule(n).weight != 0).float().mean()) for n in prunable_names(pruned)}
    assert len(set(round(v, 2) for v in kept.values())) > 1  # a mixed plan
    for name, density in kept.items():
        assert density == pytest.approx(1 - plan.level_for(name).sparsity, abs=0.02), name


def prunable_names(model):
    from compressor.models.arch import get_arch

    return [t.name for t in prunable_linears(model, get_arch(model.config))]
