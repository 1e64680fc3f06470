"""process_memory: hand-checked byte counts, the activation count against autograd's saved tensors, and the
prune prediction against the measured peak RSS of the block walk of real `compressor prune` processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from compressor.parallel.memory_plan import ModelDims, dims_for_source
from compressor.parallel.process_memory import (
    LearnSetup, PruneSetup, block_params, input_groups, predict_learn, predict_prune, saved_activation_bytes,
)

ROOT = Path(__file__).resolve().parents[2]
# h=8, 2 heads of 4, 2 KV heads (d=8), I=16, vocab 10: per layer q/k/v/o 4 x 64 + gate/up/down 3 x 128 = 640
SMALL = ModelDims(hidden=8, intermediate=16, layers=2, heads=2, kv_heads=2, vocab=10)
MiB = 2**20


def test_prune_terms_by_hand():
    s = PruneSetup(num_windows=4, seq_len=3, batch_size=2, baseline=1000)
    est = predict_prune(SMALL, s)
    assert block_params(SMALL) == 640 + 16
    assert input_groups(SMALL) == {"qkv": (24, 8), "o": (8, 8), "gate_up": (32, 8), "down": (8, 16)}
    grams = (3 * 64 + 256) * 8  # float64 h^2 x 3 groups + I^2
    stream = 4 * 3 * 8 * 4  # windows x tokens x h x float32
    common = 1000 + 656 * 4 + 4 * 3 * 8 + 2 * 2 * 3 * 4 * 4 + 640 / 8  # baseline, block, windows, rotary, packed masks
    solve = max(16 * 256, 4 * 256 + 15 * 8 * 16, 4 * 64 + 15 * 32 * 8)  # down's factor vs gate/up's sweep
    assert solve == 4096
    assert est.phases["calibrate"] == common + 3 * stream + 2 * grams + 4 * 256 + 2 * 3 * (48 + 16 + 48) * 4
    assert est.phases["solve"] == common + 2 * stream + 2 * grams + solve + 640 * 5
    assert est.phases["layer error"] == common + 2 * stream + 2 * grams + 640 * 5 + 24 * 128  # down (8 x 16)
    assert est.phases["write block"] == common + 2 * stream + 2 * grams + 640 * 5 + 656 * 4
    assert est.phases["capture"] == common - 640 / 8 + 10 * 8 * 4 + 2 * stream  # the embedding, no masks yet
    assert est.phases["load"] == 1000 + 10 * 8 * 4 + 128 * 6  # baseline, the embedding, isfinite's temporaries
    assert est.total == max(est.phases.values()) and est.phase == "solve"
    wanda = predict_prune(SMALL, PruneSetup(num_windows=4, seq_len=3, batch_size=2, baseline=1000, stats="norms",
                                            layer_error=False))
    assert "statistics" not in wanda.items and wanda.phases["solve"] == common + stream + 640 * 5


def test_prune_not_lazy_holds_the_whole_model():
    lazy = predict_prune(SMALL, PruneSetup(baseline=0))
    whole = predict_prune(SMALL, PruneSetup(baseline=0, lazy=False))
    assert whole.items["weights"] == SMALL.total_params() * 4 and lazy.items["weights"] == 656 * 4


def test_learn_terms_by_hand():
    s = LearnSetup(micro_batch=1, seq_len=3, baseline=1000)
    est = predict_learn(SMALL, s)
    masked = 2 * 640
    logits = masked // 4 * 6 * 4  # 6 patterns per group of 4, float32
    common = 1000 + SMALL.total_params() * 4 + masked + 3 * logits + masked / 4
    per_token_layer = 7 * 8 + 2 * 8 + 4 * 16
    assert est.phases["step"] == common + 2 * masked * 4 + logits + 3 * 2 * per_token_layer * 4 + 4 * 3 * 10 * 4
    assert est.phases["checkpoint"] == common + logits + 2 * logits  # the state's clone, then AdamW's states cloned
    bf16 = predict_learn(SMALL, LearnSetup(micro_batch=1, seq_len=3, baseline=0, frozen_bytes=2))
    assert bf16.items["weights"] == masked * 2 + (SMALL.total_params() - masked) * 4


def test_published_shapes_predict_what_the_bench_expects():
    from compressor.parallel.memory_plan import PRESETS

    small, big = (predict_prune(PRESETS[k]) for k in ("smollm2-135m", "qwen2.5-coder-1.5b"))
    # the lazy prune of the 1.5B model: far below its 6.6 GiB of float32 weights
    assert big.total < 0.75 * PRESETS["qwen2.5-coder-1.5b"].total_params() * 4 + big.items["baseline"]
    assert small.total < big.total


def _saved_bytes(model: torch.nn.Module, run, exclude: set[int]) -> int:
    """Bytes of the distinct storages autograd saves during ``run()``, leaving out ``exclude`` (data_ptrs)."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in exclude:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    return sum(seen.values())


@pytest.mark.parametrize("fixture", ["tiny_llama_dir", "tiny_qwen2_dir"])
def test_saved_activations_match_autograd(fixture, request):
    """What a MaskLLM micro-batch keeps for backward in the decoder layers, against the count."""
    from compressor.methods.maskllm import attach_masks, hold_samples, mask_train
    from compressor.methods.maskllm.config import MaskLLMConfig
    from compressor.models import load_model
    from compressor.models.layers import prunable_linears

    folder = request.getfixturevalue(fixture)
    loaded = load_model(str(folder))
    model, dims = loaded.model, dims_for_source(str(folder))
    names = [t.name for t in prunable_linears(model, loaded.arch, [".*"], [])]
    masks = attach_masks(model, names, MaskLLMConfig())
    mask_train(masks, True)
    model.train()
    held = hold_samples(model, masks)
    exclude = {p.untyped_storage().data_ptr() for p in model.parameters()}
    exclude |= {t.untyped_storage().data_ptr() for t in held.values()}
    ids = torch.randint(0, dims.vocab, (2, 64), generator=torch.Generator().manual_seed(0))
    base = model.get_submodule(loaded.arch.blocks.rsplit(".", 1)[0])  # the decoder without the LM head
    measured = _saved_bytes(model, lambda: base(input_ids=ids, use_cache=False), exclude)
    predicted = saved_activation_bytes(dims, tokens=2 * 64)
    assert measured == pytest.approx(predicted, rel=0.15)


def _prune(tmp: Path, folder: Path, text: Path, windows: int, name: str) -> int:
    cfg = {"model": {"source": str(folder), "lazy": True}, "sparsity": "2:4", "method": "sparsegpt",
           "calibration": {"data": {"source": str(text)}, "num_windows": windows, "seq_len": 256, "batch_size": 8},
           "evaluation": {"enabled": False}, "executor": {"kind": "inprocess"}}
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    # a fixed mmap threshold: glibc's dynamic one keeps freed batch-sized blocks in the heap, which adds a
    # varying few hundred MiB here (bench/scale.py MALLOC_ENV); the prediction counts live memory
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(2**20)}
    done = subprocess.run([sys.executable, "-m", "compressor.cli", "prune", "--config", str(path), "--output",
                           str(tmp / name)], cwd=ROOT, capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    by_phase = json.loads((tmp / name / "report.json").read_text())["memory"]["peak_rss_bytes_by_phase"]
    # the block walk's own peak: the predictor's phases; a cold token cache makes tokenizing the whole
    # file ("data") the run's peak (+66 MiB measured), which says nothing about the walk
    return max(by_phase[k] for k in ("calibrate", "solve", "error", "checkpoint") if k in by_phase)


def test_lazy_prune_peak_rss_grows_as_predicted(tmp_path, tiny_llama_dir, smollm_dir, wikitext_dir):
    """Real lazy prunes of a random model wide enough that its terms show above the process baseline
    (hidden 512, I 2048: Gram matrices of 2 and 32 MiB, streams of 64 and 128 windows x 256 tokens; below some
    40 windows the walk's peak sits at a floor of the lazy load instead). The
    baseline is measured here as the module defines it (the tiny model's run less its few MB of terms):
    hosts differ in it by some 150 MiB (CI against this machine), not in the terms."""
    from compressor.models.random_init import save_random_model

    text = wikitext_dir / "wiki.valid.tokens"
    tiny = predict_prune(dims_for_source(str(tiny_llama_dir)), PruneSetup(num_windows=16, seq_len=256, baseline=0))
    baseline = _prune(tmp_path, tiny_llama_dir, text, 16, "tiny") - tiny.total
    folder = save_random_model(tmp_path / "wide", "tiny", "llama", 0, hidden_size=512, intermediate_size=2048,
                               num_attention_heads=8, num_key_value_heads=4)
    dims = dims_for_source(str(folder))
    few, many = (_prune(tmp_path, folder, text, n, f"w{n}") for n in (64, 128))
    predicted = {n: predict_prune(dims, PruneSetup(num_windows=n, seq_len=256, baseline=baseline)) for n in (64, 128)}
    growth = predicted[128].total - predicted[64].total
    print(f"baseline {baseline / MiB:.1f} MiB; measured {few / MiB:.1f} / {many / MiB:.1f} MiB, predicted "
          f"{predicted[64].total / MiB:.1f} / {predicted[128].total / MiB:.1f} MiB")
    assert growth > 90 * MiB  # the activation streams: 3 x 64 windows x 256 tokens x 512 x 4 B
    # the walk's RSS varies by some 20 MiB from run to run at this size: a loose bound, which still fails
    # when a stream too many or too few is alive (32 MiB per stream here)
    assert many - few == pytest.approx(growth, rel=0.3)
    for n, measured in ((64, few), (128, many)):
        assert measured == pytest.approx(predicted[n].total, rel=0.15), predicted[n].table()
