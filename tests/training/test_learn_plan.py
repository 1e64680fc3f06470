"""`compressor learn` (MaskLLM) with a mixed N:M sparsity plan on a tiny LLaMA."""

from math import comb

import pytest
import torch
import yaml

from compressor.checkpoints.logits import load_logits, logits_levels, logits_sparsity
from compressor.checkpoints.masks import load_masks, mask_file_levels
from compressor.config.base import validate_config
from compressor.errors import ConfigError
from compressor.models import load_model
from compressor.runs.learn import run_learn
from compressor.sparsity import NM
from compressor.sparsity.plan import PlanError, SparsityPlan
from compressor.training.config import LearnConfig

PLAN = {"default": "2:4", "layers": {r".*self_attn\..*_proj": "4:8", "model.layers.1.mlp.down_proj": "1:4"}}


def level_of(name: str) -> NM:
    if name.startswith("model.layers.1.mlp.down_proj"):
        return NM(1, 4)
    return NM(4, 8) if "self_attn" in name else NM(2, 4)


def _cfg(tmp_path, model, text, plan=PLAN, **over):
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(plan))
    data = {
        "model": {"source": str(model)},
        "sparsity_plan": str(path),
        "maskllm": {"logits_lr": 0.05},
        "prior": {"kind": "magnitude"},
        "train": {"data": {"source": str(text)}, "seq_len": 32, "micro_batch_size": 2, "grad_accum": 1,
                  "steps": 3, "log_every": 1, "eval_every": None, "checkpoint_every": 3},
        "evaluation": {"enabled": False},
        **over,
    }
    return validate_config(LearnConfig, data)


def test_maskllm_learns_each_layers_own_n_m(tmp_path, tiny_llama_dir, text_file):
    out = tmp_path / "run"
    report = run_learn(_cfg(tmp_path, tiny_llama_dir, text_file), out)
    assert report["sparsity"] == "mixed" and report["pattern_ok"] is True
    # the prior (magnitude, made with the plan) sets most groups of the step-0 hard mask
    assert 0.5 < report["prior_agreement"] <= 1.0

    logits = load_logits(out / "logits.safetensors")
    masks = load_masks(out / "masks.safetensors")
    model = load_model(str(out / "model")).model
    assert len(logits) == len(masks) == 14
    for name, mask in masks.items():
        nm = level_of(name)
        assert logits[name].shape == (mask.shape[0], mask.shape[1] // nm.m, comb(nm.m, nm.n)), name
        groups = mask.reshape(mask.shape[0], -1, nm.m).sum(-1)
        assert bool((groups == nm.n).all()), name
        assert torch.equal(model.get_parameter(name) != 0, mask)
    assert logits_sparsity(out / "logits.safetensors") is None
    assert logits_levels(out / "logits.safetensors") == {n: level_of(n) for n in masks}
    assert mask_file_levels(out / "masks.safetensors") == {n: level_of(n) for n in masks}
    assert set(SparsityPlan.load(out / "plan.json").layers) == {n[: -len(".weight")] for n in masks}
    assert "## Sparsity plan" in (out / "report.md").read_text()
    # the logits transfer to a new run with the same plan
    again = run_learn(_cfg(tmp_path, tiny_llama_dir, text_file, init_logits=str(out), **{"train": {
        "data": {"source": str(text_file)}, "seq_len": 32, "micro_batch_size": 2, "steps": 1, "eval_every": None}}),
        tmp_path / "again")
    assert again["pattern_ok"] is True


def test_an_unstructured_level_is_an_error_naming_the_layer(tmp_path, tiny_llama_dir, text_file, monkeypatch):
    import compressor.runs.learn as learn

    monkeypatch.setattr(learn, "prior_masks", lambda *a, **k: pytest.fail("the prior ran with a bad plan"))
    plan = {"default": "2:4", "layers": {"model.layers.0.mlp.up_proj": 0.5}}
    with pytest.raises(PlanError, match=r"model\.layers\.0\.mlp\.up_proj has the unstructured level 0\.5; MaskLLM "
                                        r"learns N:M masks only"):
        run_learn(_cfg(tmp_path, tiny_llama_dir, text_file, plan=plan), tmp_path / "run")
    plan = {"default": "2:4", "layers": {"model.layers.0.mlp.up_proj": "8:16"}}
    with pytest.raises(PlanError, match=r"model\.layers\.0\.mlp\.up_proj: sparsity 8:16 has C\(16,8\)"):
        run_learn(_cfg(tmp_path, tiny_llama_dir, text_file, plan=plan), tmp_path / "run")


def test_plan_config_rules(tmp_path):
    with pytest.raises(ConfigError, match="give maskllm.sparsity .* or sparsity_plan .*, not both"):
        validate_config(LearnConfig, {"sparsity_plan": "p.yaml", "maskllm": {"sparsity": "2:4"}})
    with pytest.raises(ConfigError, match="sparsity_plan applies to method.kind maskllm only"):
        validate_config(LearnConfig, {"sparsity_plan": "p.yaml", "method": {"kind": "srste"}, "prior": {}})
