"""train_rank end to end on two pipeline ranks: outputs the exporter reads, and an exact resume."""

from __future__ import annotations

import json
import socket

import pytest
import torch
from safetensors.torch import load_file

from compressor.checkpoints.logits import load_logits, logits_to_masks
from compressor.checkpoints.masks import load_masks
from compressor.parallel.config import DistributedLearnConfig
from compressor.reporting.tensorboard import read_scalars
from compressor.sparsity import NM, assert_nm
from tests.parallel.megatron_workers import run_ranks, train

pytest.importorskip("megatron.core")
pytestmark = pytest.mark.distributed


def make_cfg(model_dir, text_file, steps: int, **parallel) -> DistributedLearnConfig:
    constant = lambda v: {"start": v, "end": v, "kind": "constant"}  # noqa: E731  (independent of train.steps)
    return DistributedLearnConfig.model_validate({
        "model": {"source": str(model_dir)},
        "maskllm": {"sparsity": "2:4", "tau": constant(2.0), "kappa": constant(200.0), "regularizer": constant(1e-3),
                    "logits_lr": 0.05},
        "train": {"data": {"source": str(text_file), "chunk_bytes": 4096}, "seq_len": 24, "micro_batch_size": 2,
                  "grad_accum": 2, "steps": steps, "seed": 4, "shuffle_buffer": 4, "log_every": 1, "eval_every": 2,
                  "checkpoint_every": 2},
        "evaluation": {"data": {"source": str(text_file)}, "seq_len": 24, "max_windows": 4, "batch_size": 2},
        "parallel": parallel,
    })


@pytest.fixture(scope="module")
def uninterrupted(tiny_llama_dir, tmp_path_factory, wikitext_dir):
    root = tmp_path_factory.mktemp("train")
    text = root / "text.txt"
    text.write_text((wikitext_dir / "wiki.valid.tokens").read_text()[:60_000])
    out = root / "full"
    run_ranks(train, 2, make_cfg(tiny_llama_dir, text, 4, pipeline=2), str(out))
    return text, out


def test_train_rank_writes_what_the_exporter_reads(uninterrupted, tiny_llama_dir):
    from compressor.checkpoints.convert import open_source

    _, out = uninterrupted
    report = json.loads((out / "report.json").read_text())
    host = socket.gethostname()  # spawned ranks, no Ray node id: each rank's host
    assert report["parallel"] == {"tensor": 1, "pipeline": 2, "data": 1, "world_size": 2, "micro_batches": 2,
                                  "nodes": [host, host]}
    logs = report["history"]["logs"]
    assert [r["step"] for r in logs] == [1, 2, 3, 4] and all(r["loss"] > 0 for r in logs)
    assert {"tau", "kappa", "lambda", "max_prob", "flip_rate", "tokens_per_second"} <= set(logs[0])
    assert [e["step"] for e in report["history"]["evals"]] == [2, 4] and report["perplexity"]["perplexity"] > 1
    assert len(report["memory"]["peak_rss_bytes_per_rank"]) == 2
    scalars = read_scalars(out / report["outputs"]["tensorboard"])  # rank 0's curves, for TensorBoard
    assert scalars["train/loss"] == [(r["step"], pytest.approx(r["loss"])) for r in logs]
    assert [s for s, _ in scalars["eval/perplexity"]] == [2, 4]

    masks, logits = load_masks(out / "masks.safetensors"), load_logits(out / "logits.safetensors")
    assert len(masks) == 14 and set(masks) == set(logits)  # 7 HF linears x 2 layers, HF names
    assert masks["model.layers.1.mlp.down_proj.weight"].shape == (64, 128)
    for name, mask in logits_to_masks(logits, "2:4").items():
        assert torch.equal(mask, masks[name]), name
        assert_nm(mask, NM(2, 4))
    source = open_source(out)  # `compressor export <run>`: the base model with the learned masks applied
    dense = load_file(str(tiny_llama_dir / "model.safetensors"))
    name = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(source.get(name), dense[name] * masks[name])
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_0000004"


def test_the_exporter_reads_an_unfinished_runs_last_distributed_checkpoint(uninterrupted, tmp_path):
    import shutil

    from compressor.checkpoints.convert import open_source
    from compressor.checkpoints.logits import load_dist_logits

    _, full = uninterrupted
    final = load_logits(full / "logits.safetensors")
    from_checkpoint = load_dist_logits(full / "checkpoints" / "step_0000004")  # the last step: the final logits
    assert set(from_checkpoint) == set(final)
    for name in final:
        assert torch.equal(from_checkpoint[name].float(), final[name]), name
    run = tmp_path / "killed"  # as a run killed after its last checkpoint: no final masks or logits yet
    shutil.copytree(full, run, symlinks=True)
    (run / "masks.safetensors").unlink()
    (run / "logits.safetensors").unlink()
    source = open_source(run)
    name = "model.layers.1.mlp.up_proj.weight"
    assert torch.equal(source.mask(name), logits_to_masks({name: final[name]}, "2:4")[name])


def test_resume_continues_exactly(uninterrupted, tiny_llama_dir, tmp_path):
    text, full = uninterrupted
    out = tmp_path / "resumed"
    run_ranks(train, 2, make_cfg(tiny_llama_dir, text, 2, pipeline=2), str(out))  # stops after step 2
    first = json.loads((out / "report.json").read_text())["history"]["logs"]
    assert [r["step"] for r in first] == [1, 2]
    run_ranks(train, 2, make_cfg(tiny_llama_dir, text, 4, pipeline=2), str(out))  # resumes from step_0000002

    a, b = load_logits(full / "logits.safetensors"), load_logits(out / "logits.safetensors")
    for name in a:
        assert torch.equal(a[name], b[name]), name
    want = json.loads((full / "report.json").read_text())["history"]
    got = json.loads((out / "report.json").read_text())["history"]
    assert [r["loss"] for r in got["logs"]] == [r["loss"] for r in want["logs"]]
    assert [r["max_prob"] for r in got["logs"]] == [r["max_prob"] for r in want["logs"]]
    assert got["evals"] == want["evals"]
    assert [s for s, _ in read_scalars(out / "tensorboard")["train/loss"]] == [1, 2, 3, 4]  # each step once


def test_resume_refuses_a_changed_config(uninterrupted, tiny_llama_dir, tmp_path):
    import shutil

    text, full = uninterrupted
    out = tmp_path / "changed"
    shutil.copytree(full, out, symlinks=True)
    cfg = make_cfg(tiny_llama_dir, text, 6, pipeline=2)
    cfg = cfg.model_copy(update={"maskllm": cfg.maskllm.model_copy(update={"logits_lr": 0.1})})
    with pytest.raises(Exception, match="config differs from the saved run's in maskllm"):
        run_ranks(train, 2, cfg, str(out))


def test_parallel_sizes_are_validated_with_a_fix():
    with pytest.raises(ValueError, match=r"world_size=3 is not a multiple of tensor \(2\) x pipeline \(1\)"):
        DistributedLearnConfig.model_validate({"parallel": {"tensor": 2, "world_size": 3}})
    assert DistributedLearnConfig.model_validate({"parallel": {"tensor": 2, "world_size": 4}}).parallel.data == 2
    assert DistributedLearnConfig.model_validate({"parallel": {"pipeline": 2, "data": 3}}).parallel.world_size == 6
    with pytest.raises(ValueError, match="needs the whole model in one process.*kind: file"):
        DistributedLearnConfig.model_validate({"prior": {"kind": "sparsegpt"}})
    with pytest.raises(ValueError, match="micro_batches=4 and train.grad_accum=2"):
        DistributedLearnConfig.model_validate({"parallel": {"micro_batches": 4}, "train": {"grad_accum": 2}})
    assert DistributedLearnConfig.model_validate({"parallel": {"micro_batches": 4}}).num_microbatches == 4


def test_a_mixed_plan_learns_each_layers_level_on_tensor_parallel_ranks(uninterrupted, tiny_llama_dir, tmp_path):
    """`compressor launch` with a sparsity plan: 4:8 attention (q, k, v fused: one level), layer 1's down
    projection 1:4, the rest 2:4, on TP=2; the outputs carry each layer's level."""
    import yaml

    from compressor.checkpoints.logits import logits_levels
    from compressor.checkpoints.masks import mask_file_levels
    from compressor.sparsity import is_nm
    from compressor.sparsity.plan import SparsityPlan

    text, _ = uninterrupted
    plan = tmp_path / "plan.yaml"
    plan.write_text(yaml.safe_dump({"default": "2:4", "layers": {r".*self_attn\..*_proj": "4:8",
                                                                 "model.layers.1.mlp.down_proj": "1:4"}}))
    data = make_cfg(tiny_llama_dir, text, 2, tensor=2).model_dump(mode="json", exclude_unset=True)
    data["maskllm"].pop("sparsity")
    data["sparsity_plan"] = str(plan)
    out = tmp_path / "mixed"
    run_ranks(train, 2, DistributedLearnConfig.model_validate(data), str(out))

    def level(name: str) -> NM:
        return NM(4, 8) if "self_attn" in name else NM(1, 4) if "layers.1.mlp.down" in name else NM(2, 4)

    report = json.loads((out / "report.json").read_text())
    assert report["sparsity"] == "mixed" and report["pattern_ok"] is True
    masks, logits = load_masks(out / "masks.safetensors"), load_logits(out / "logits.safetensors")
    assert len(masks) == 14
    for name, mask in masks.items():
        assert is_nm(mask, level(name)), name
        assert torch.equal(logits_to_masks({name: logits[name]}, level(name))[name], mask), name
    assert mask_file_levels(out / "masks.safetensors") == logits_levels(out / "logits.safetensors") == \
        {n: level(n) for n in masks}
    assert set(SparsityPlan.load(out / "plan.json").layers) == {n[: -len(".weight")] for n in masks}
    assert (out / "plots" / "levels.png").stat().st_size > 1000 and report["plan"]["uniform"] is False
    # the finished run continues with more steps: its plan.json (now the full listing) holds the same levels
    data["train"]["steps"] = 3
    run_ranks(train, 2, DistributedLearnConfig.model_validate(data), str(out))
    assert [r["step"] for r in json.loads((out / "report.json").read_text())["history"]["logs"]] == [1, 2, 3]
    plan.write_text(yaml.safe_dump({"default": "2:4"}))
    data["train"]["steps"] = 4
    with pytest.raises(Exception, match="the sparsity plan .* differs from the one the run started with"):
        run_ranks(train, 2, DistributedLearnConfig.model_validate(data), str(out))
