"""`compressor prune` with a sparsity plan on a tiny LLaMA: every layer at its own level, plan.json,
masks metadata, the report's level table; bad plans fail before any work, naming the layer."""

import json
from fractions import Fraction

import pytest
import torch
import yaml
from safetensors import safe_open

from compressor.checkpoints.masks import load_masks, mask_file_levels
from compressor.config.base import validate_config
from compressor.errors import ConfigError
from compressor.models import load_model
from compressor.runs.prune import PruneConfig, run_prune
from compressor.sparsity import NM, Unstructured, is_nm
from compressor.sparsity.plan import PlanError, SparsityPlan

# MLP 2:4 (the default), attention 4:8, block 0's k_proj 1:4 (so q/k/v of block 0 cannot be stacked),
# one layer unstructured
PLAN = {"default": "2:4",
        "layers": {r".*self_attn\..*_proj": "4:8", "model.layers.0.self_attn.k_proj": "1:4",
                   "model.layers.1.mlp.down_proj": 0.5}}
SHAPES = {"q_proj": (64, 64), "k_proj": (32, 64), "v_proj": (32, 64), "o_proj": (64, 64),
          "gate_proj": (128, 64), "up_proj": (128, 64), "down_proj": (64, 128)}


def expected_level(name: str):
    if name in PLAN["layers"]:
        value = PLAN["layers"][name]
        return Unstructured(value) if isinstance(value, float) else NM.parse(value)
    return NM(4, 8) if "self_attn" in name else NM(2, 4)


def _cfg(tmp_path, model, text, plan=PLAN, **extra):
    path = tmp_path / "plans" / "plan.yaml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(yaml.safe_dump(plan))
    data = {"model": {"source": str(model)}, "method": extra.pop("method", "wanda"), "sparsity_plan": str(path),
            "calibration": {"data": {"source": str(text)}, "num_windows": 8, "seq_len": 64, "batch_size": 4},
            "evaluation": {"enabled": False}, "executor": {"kind": "inprocess"}, **extra}
    return validate_config(PruneConfig, data)


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_a_mixed_plan_gives_every_layer_its_own_level(tmp_path, tiny_llama_dir, text_file, method):
    out = tmp_path / "run"
    report = run_prune(_cfg(tmp_path, tiny_llama_dir, text_file, method=method), out)

    pruned = load_model(str(out / "model")).model
    masks = load_masks(out / "masks.safetensors")
    assert len(masks) == 14
    for name, mask in masks.items():
        level = expected_level(name[: -len(".weight")])
        weight = pruned.get_parameter(name)
        assert torch.equal(weight != 0, mask)
        if isinstance(level, NM):
            groups = mask.reshape(mask.shape[0], -1, level.m).sum(-1)
            assert bool((groups == level.n).all()), name  # exactly N of M: not just "at most"
        else:
            assert float((~mask).float().mean()) == 0.5 and not is_nm(mask, NM(2, 4))
    assert report["sparsity"] == "mixed" and report["summary"]["pattern_ok"] is True

    # masks metadata: every layer's level
    levels = mask_file_levels(out / "masks.safetensors")
    assert levels == {n: expected_level(n[: -len(".weight")]) for n in masks}

    # plan.json lists every layer and resolves to the same levels
    saved = SparsityPlan.load(out / "plan.json")
    names = [n[: -len(".weight")] for n in masks]
    assert set(saved.layers) == set(names)
    shapes = {n: SHAPES[n.rsplit(".", 1)[-1]] for n in names}
    assert saved.resolve(shapes).levels == {n: expected_level(n) for n in names}

    # the exact parameter-weighted average, and the level table
    def pruned_fraction(level):
        return Fraction(str(level.sparsity)) if isinstance(level, Unstructured) else Fraction(level.m - level.n, level.m)

    exact = (sum(pruned_fraction(expected_level(n)) * o * i for n, (o, i) in shapes.items())
             / sum(o * i for o, i in shapes.values()))
    plan = report["plan"]
    assert plan["average_sparsity_exact"] == f"{exact.numerator}/{exact.denominator}"
    assert plan["average_sparsity"] == pytest.approx(float(exact)) and plan["uniform"] is False
    rows = {r["name"]: r["level"] for r in plan["levels"]}
    assert rows["model.layers.1.mlp.down_proj"] == "0.5" and rows["model.layers.0.self_attn.k_proj"] == "1:4"
    md = (out / "report.md").read_text()
    assert "## Sparsity plan" in md and "| model.layers.0.self_attn.k_proj | 32 x 64 | 1:4 |" in md
    assert "plots/levels.png" in report["outputs"]["plots"] and (out / "plots" / "levels.png").stat().st_size > 1000
    assert json.loads((out / "report.json").read_text())["outputs"]["plan"] == "plan.json"


def test_a_uniform_run_writes_what_it_wrote_before(tmp_path, tiny_llama_dir, text_file):
    cfg = validate_config(PruneConfig, {
        "model": {"source": str(tiny_llama_dir)}, "method": "magnitude", "layer_error": False,
        "evaluation": {"enabled": False}, "executor": {"kind": "inprocess"}})
    out = tmp_path / "run"
    report = run_prune(cfg, out)
    assert not (out / "plan.json").exists() and "plan" not in report and report["sparsity"] == "2:4"
    with safe_open(str(out / "masks.safetensors"), framework="pt") as fh:
        meta = fh.metadata()
    assert meta["sparsity"] == "2:4" and "levels" not in meta
    assert mask_file_levels(out / "masks.safetensors") is None
    assert "Sparsity plan" not in (out / "report.md").read_text()


def test_sparsity_and_a_plan_together_are_an_error(tmp_path):
    with pytest.raises(ConfigError, match="give sparsity .* or sparsity_plan .*, not both"):
        validate_config(PruneConfig, {"sparsity": "2:4", "sparsity_plan": str(tmp_path / "p.yaml")})
    # the saved config of a plan run (sparsity: null) loads again
    cfg = validate_config(PruneConfig, {"sparsity": None, "sparsity_plan": "p.yaml"})
    assert cfg.sparsity is None and cfg.model_dump(mode="json")["sparsity"] is None
    with pytest.raises(ConfigError, match="sparsity is empty"):
        validate_config(PruneConfig, {"sparsity": None})


def test_the_plan_is_an_input_path_of_the_run(tmp_path, tiny_llama_dir, text_file):
    from compressor.config.base import input_paths

    from compressor.errors import OutputExistsError

    cfg = _cfg(tmp_path, tiny_llama_dir, text_file)
    assert input_paths(cfg)["sparsity_plan"] == str(tmp_path / "plans" / "plan.yaml")
    with pytest.raises(OutputExistsError, match="contains the sparsity_plan"):  # the folder holding the plan
        run_prune(cfg, tmp_path / "plans")
    assert (tmp_path / "plans" / "plan.yaml").is_file()


@pytest.mark.parametrize("plan, message", [
    ({"default": "2:4", "layers": {".*q_proj": "1:4"}, "target": 0.5}, r"not the declared target 0\.5"),
    ({"default": "2:4", "layers": {"model.layers.7.mlp.down_proj": "1:4"}},
     r"'model\.layers\.7\.mlp\.down_proj' matches no pruned linear"),
    ({"default": "2:4", "layers": {"model.layers.0.mlp.up_proj": "1:3"}},
     r"model\.layers\.0\.mlp\.up_proj: level 1:3 is impossible, its input width 64"),
])
def test_a_bad_plan_fails_before_any_work(tmp_path, tiny_llama_dir, text_file, monkeypatch, plan, message):
    import compressor.runs.prune as prune

    def no_work(*args, **kwargs):
        raise AssertionError("the pipeline ran with a plan that does not fit the model")

    monkeypatch.setattr(prune, "prune_sequential", no_work)
    monkeypatch.setattr("compressor.data.calibration_windows", no_work)
    with pytest.raises(PlanError, match=message):
        run_prune(_cfg(tmp_path, tiny_llama_dir, text_file, plan=plan), tmp_path / "run")
    assert not (tmp_path / "run").exists()  # nothing left that blocks the next try


def test_resume_holds_the_run_to_its_plan(tmp_path, tiny_llama_dir, text_file, monkeypatch):
    from compressor.pipelines.block_store import BlockStore

    out = tmp_path / "run"
    real_save = BlockStore.save

    def save_then_die(self, block, results):
        real_save(self, block, results)
        raise KeyboardInterrupt  # killed after the first block's results are on disk

    monkeypatch.setattr(BlockStore, "save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        run_prune(_cfg(tmp_path, tiny_llama_dir, text_file), out)
    monkeypatch.setattr(BlockStore, "save", real_save)
    assert SparsityPlan.load(out / "plan.json") == SparsityPlan.model_validate(PLAN)  # the copy made at the start

    other = {**PLAN, "layers": {**PLAN["layers"], "model.layers.0.mlp.up_proj": "1:4"}}
    with pytest.raises(ConfigError, match="the sparsity plan .* differs from the one the run started with"):
        run_prune(_cfg(tmp_path, tiny_llama_dir, text_file, plan=other), out, resume=True)
    report = run_prune(_cfg(tmp_path, tiny_llama_dir, text_file), out, resume=True)
    assert report["summary"]["resumed_blocks"] == 1 and report["summary"]["pattern_ok"] is True
    assert set(SparsityPlan.load(out / "plan.json").layers) == {r["name"] for r in report["plan"]["levels"]}


def test_the_command_line_gives_a_plan_over_a_config_with_sparsity(tmp_path, tiny_llama_dir, capsys):
    from compressor.cli import main

    (tmp_path / "plan.yaml").write_text(yaml.safe_dump(PLAN))
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({"model": {"source": str(tiny_llama_dir)}, "sparsity": "2:4", "method": "magnitude",
                                   "layer_error": False, "evaluation": {"enabled": False},
                                   "executor": {"kind": "inprocess"}}))
    plan = f"sparsity_plan={tmp_path / 'plan.yaml'}"
    assert main(["prune", "--config", str(cfg), "--output", str(tmp_path / "a"), "--set", plan]) == 2
    assert "not both" in capsys.readouterr().err
    assert main(["prune", "--config", str(cfg), "--output", str(tmp_path / "b"), "--set", plan,
                 "--set", "sparsity=null"]) == 0
    assert "magnitude mixed" in capsys.readouterr().out
    assert mask_file_levels(tmp_path / "b" / "masks.safetensors")["model.layers.1.mlp.down_proj.weight"] == Unstructured(0.5)
