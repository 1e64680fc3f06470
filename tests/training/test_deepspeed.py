"""`compressor learn` on 2 DeepSpeed ranks (gloo on CPU). ZeRO-3: each rank holds half of every weight and
logit tensor, the logits match one process, and a run killed after a checkpoint resumes bit for bit
(as under ZeRO-2)."""

import json
import math
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from compressor.checkpoints.logits import load_logits
from compressor.checkpoints.masks import load_masks
from compressor.errors import ConfigError
from compressor.models import load_model
from compressor.runs.learn import run_learn
from compressor.sparsity import NM, is_nm
from compressor.utils.run_folder import open_run_folder
from tests.training.test_learn import _cfg, _Interleaved

pytestmark = pytest.mark.distributed

# one micro-batch per rank and step: the single process sees both ranks' windows as one batch of 2
BASE = {"train.grad_accum": 1, "train.steps": 4, "train.checkpoint_every": 2, "train.eval_every": 2,
        "evaluation.max_windows": 2, "maskllm.sample_every": "micro_batch"}


class _Kill(Exception):
    pass


def _rank(rank: int, world: int, cfg, out: str, kill_at: int) -> None:
    """One spawned rank of `compressor learn` that records its parameter partition sizes and, given
    ``kill_at``, dies right after writing that step's checkpoint."""
    import compressor.runs.learn as learn
    import compressor.training.loop as loop

    real_train, real_save = learn.train, loop._save

    def train_recording(model, *args, **kwargs):  # after deepspeed.initialize partitioned the model
        sizes = {n: [int(p.ds_numel), int(p.ds_tensor.numel())] for n, p in model.named_parameters()
                 if hasattr(p, "ds_tensor")}  # ZeRO-3 only
        (Path(out) / f"partition_rank{rank}.json").write_text(json.dumps(sizes))
        return real_train(model, *args, **kwargs)

    def save_then_die(root, step, *args, **kwargs):
        real_save(root, step, *args, **kwargs)
        if step == kill_at:
            raise _Kill(f"killed after the checkpoint of step {step}")

    learn.train, loop._save = train_recording, save_then_die
    learn._worker(rank, world, cfg, out)


def _deepspeed(tiny_llama_dir, text, port, stage=3):
    return _cfg(tiny_llama_dir, text, **{**BASE, "train.micro_batch_size": 1}, backend="deepspeed",
                deepspeed={"zero_stage": stage, "world_size": 2, "master_port": port, "zero3_persistence_threshold": 0})


def _spawn(cfg, out: Path, resume: bool = False, kill_at: int = 0) -> None:
    """What `compressor learn` does with ``deepspeed.world_size: 2``, with the ranks instrumented."""
    open_run_folder(out, "learn", resume=resume)
    mp.spawn(_rank, args=(2, cfg, str(out), kill_at), nprocs=2, join=True)


@pytest.fixture(scope="module")
def whole(tmp_path_factory, tiny_llama_dir, text):
    """An uninterrupted 2-rank ZeRO-3 run."""
    out = tmp_path_factory.mktemp("zero3") / "whole"
    _spawn(_deepspeed(tiny_llama_dir, text, 29571), out)
    return out


def test_zero3_partitions_and_matches_single_process(tmp_path, tiny_llama_dir, text, whole, monkeypatch):
    for rank in range(2):
        sizes = json.loads((whole / f"partition_rank{rank}.json").read_text())
        assert any(n.endswith("parametrizations.weight.original") for n in sizes)
        assert any(n.endswith(".logits") for n in sizes)
        for name, (total, local) in sizes.items():
            assert local == math.ceil(total / 2), name  # this rank's slice only, frozen weights and logits alike

    import compressor.runs.learn as learn

    real = learn.make_stream
    monkeypatch.setattr(learn, "make_stream", lambda cfg, tok, rank, world: _Interleaved(
        [real(cfg, tok, r, 2) for r in range(2)]))
    one = run_learn(_cfg(tiny_llama_dir, text, **{**BASE, "train.micro_batch_size": 2}), tmp_path / "one")
    two = json.loads((whole / "report.json").read_text())
    assert two["world_size"] == 2
    # the prior's hard mask, evaluated by both ZeRO-3 ranks together, is the same model as one process's
    assert two["history"]["evals"][0]["perplexity"] == pytest.approx(one["history"]["evals"][0]["perplexity"], rel=1e-4)
    assert [r["step"] for r in two["history"]["logs"]] == [2, 4]
    assert two["history"]["logs"][0]["loss"] == pytest.approx(one["history"]["logs"][0]["loss"], rel=1e-4)
    assert two["memory_per_masked_weight"] == one["memory_per_masked_weight"]

    a = load_logits(tmp_path / "one" / "logits.safetensors")
    b = load_logits(whole / "logits.safetensors")
    assert a.keys() == b.keys()
    diff = torch.cat([(a[n] - b[n]).abs().flatten() for n in a])
    # as for ZeRO-1/2 (test_learn.py): last-bit differences of the gradient reduction can move a logit whose
    # gradient is ~0 by up to ~lr (0.05) per Adam step; everything else agrees to float precision
    assert (diff > 1e-4).float().mean() < 1e-2
    assert diff.max() < 4 * 0.05

    # rank 0 wrote W * hard mask, gathered layer by layer, as a plain HF model
    masks = load_masks(whole / "masks.safetensors")
    dense = load_model(str(tiny_llama_dir)).model
    baked = load_model(str(whole / "model")).model
    assert len(masks) == 14
    for name, mask in masks.items():
        assert is_nm(mask, NM(2, 4))
        assert torch.equal(baked.get_parameter(name), dense.get_parameter(name) * mask)
    dense_params = dict(dense.named_parameters())
    for name, p in baked.named_parameters():
        if name not in masks:
            assert torch.equal(p, dense_params[name]), name


def _kill_and_resume(cfg, out: Path) -> None:
    with pytest.raises(Exception, match="killed after the checkpoint of step 2"):
        _spawn(cfg, out, kill_at=2)
    assert not (out / "report.json").exists()
    _spawn(cfg, out, resume=True)


def test_zero2_resume_after_kill_reproduces_logits(tmp_path, tiny_llama_dir, text):
    # ZeRO-1/2 optimizers load a list of every rank's state (a single state failed with KeyError: 1)
    cfg = _deepspeed(tiny_llama_dir, text, 29573, stage=2)
    _spawn(cfg, tmp_path / "whole")
    _kill_and_resume(cfg, tmp_path / "killed")
    reference = load_logits(tmp_path / "whole" / "logits.safetensors")
    resumed = load_logits(tmp_path / "killed" / "logits.safetensors")
    for name in reference:
        assert torch.equal(reference[name], resumed[name]), name


def test_zero3_resume_after_kill_reproduces_logits(tmp_path, tiny_llama_dir, text, whole):
    _kill_and_resume(_deepspeed(tiny_llama_dir, text, 29572), tmp_path / "killed")
    resumed = load_logits(tmp_path / "killed" / "logits.safetensors")
    reference = load_logits(whole / "logits.safetensors")
    for name in reference:
        assert torch.equal(reference[name], resumed[name]), name
    mine = json.loads((tmp_path / "killed" / "report.json").read_text())["history"]
    theirs = json.loads((whole / "report.json").read_text())["history"]
    assert mine["evals"] == theirs["evals"]
    key = lambda r: (r["step"], r["loss"], r["max_prob"], r["flip_rate"])  # noqa: E731 (timings differ)
    assert [key(r) for r in mine["logs"]] == [key(r) for r in theirs["logs"]]


def test_zero3_needs_samples_per_micro_batch(tiny_llama_dir, text):
    with pytest.raises(ConfigError, match="set maskllm.sample_every: micro_batch"):
        _cfg(tiny_llama_dir, text, backend="deepspeed", deepspeed={"zero_stage": 3})
    _cfg(tiny_llama_dir, text, backend="deepspeed", deepspeed={"zero_stage": 3}, **{"maskllm.sample_every": "micro_batch"})


def test_engine_config_passes_zero3_gather_settings_only_when_set():
    from compressor.training.backends import DeepSpeedConfig

    zero = DeepSpeedConfig(zero_stage=3).engine_config(micro_batch=2, grad_accum=4)["zero_optimization"]
    assert zero == {"stage": 3, "stage3_param_persistence_threshold": 100_000}  # DeepSpeed's defaults otherwise
    cfg = DeepSpeedConfig(zero_stage=3, zero3_prefetch_bucket_size=10**6, zero3_max_live_parameters=5 * 10**6,
                          zero3_max_reuse_distance=0)
    zero = cfg.engine_config(2, 4)["zero_optimization"]
    assert zero["stage3_prefetch_bucket_size"] == 10**6 and zero["stage3_max_live_parameters"] == 5 * 10**6
    assert zero["stage3_max_reuse_distance"] == 0
    assert DeepSpeedConfig(zero_stage=2, zero3_prefetch_bucket_size=10**6).engine_config(2, 4)["zero_optimization"] \
        == {"stage": 2}
    with pytest.raises(ValueError, match="zero3_max_live_parameters"):
        DeepSpeedConfig(zero_stage=3, zero3_max_live_parameters=-1)


def test_srste_on_two_ranks_matches_single_process(tmp_path, tiny_llama_dir, text, monkeypatch):
    """A weight-training learner on DeepSpeed ZeRO-2: the weights after 3 steps are those of one process
    that sees both ranks' windows as one batch."""
    import compressor.runs.learn as learn
    from tests.training.test_learners import _cfg as weights_cfg

    lr = 1e-3
    method = {"kind": "srste", "lr": lr, "lambda_w": {"start": 0.05, "end": 0.05}}
    base = {"evaluation.enabled": False, "train.grad_accum": 1, "train.steps": 3, "train.checkpoint_every": 3}
    real = learn.make_stream
    monkeypatch.setattr(learn, "make_stream", lambda cfg, tok, rank, world: _Interleaved(
        [real(cfg, tok, r, 2) for r in range(2)]))
    one = run_learn(weights_cfg(tiny_llama_dir, text, method, **{**base, "train.micro_batch_size": 2}), tmp_path / "one")
    monkeypatch.setattr(learn, "make_stream", real)
    two = run_learn(weights_cfg(tiny_llama_dir, text, method, **{**base, "train.micro_batch_size": 1},
                                backend="deepspeed", deepspeed={"zero_stage": 2, "world_size": 2, "master_port": 29575}),
                    tmp_path / "two")
    assert two["world_size"] == 2 and two["pattern_ok"]
    assert two["history"]["logs"][-1]["loss"] == pytest.approx(one["history"]["logs"][-1]["loss"], rel=1e-4)
    a = load_model(str(tmp_path / "one" / "model")).model.state_dict()
    b = load_model(str(tmp_path / "two" / "model")).model.state_dict()
    diff = torch.cat([(a[n] - b[n]).abs().flatten() for n in a])
    # as for the logits above: Adam can move a weight whose gradient is ~0 by up to ~lr per step on
    # last-bit differences of the all-reduce; everything else agrees to float precision
    assert (diff > 1e-5).float().mean() < 1e-2
    assert diff.max() < 3 * 2 * lr
    masks_one = load_masks(tmp_path / "one" / "masks.safetensors")
    masks_two = load_masks(tmp_path / "two" / "masks.safetensors")
    flips = sum(int((masks_one[n] != masks_two[n]).sum()) for n in masks_one)
    assert flips <= 1e-3 * sum(m.numel() for m in masks_one.values())
