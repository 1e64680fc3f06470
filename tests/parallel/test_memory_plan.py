"""memory_plan: hand-checked byte counts, layout checks, and the configs' comments matching the plan."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from compressor.parallel.memory_plan import (
    PRESETS, ModelDims, Setup, check_layout, dims_for_source, main, peak, plan_memory, setup_from_config,
)

ROOT = Path(__file__).resolve().parents[2]
# h=8, 2 heads of 4, 2 KV heads (d=8), I=16: per layer q 64 + k 64 + v 64 + o 64 + gate/up/down 3 x 128 = 640
SMALL = ModelDims(hidden=8, intermediate=16, layers=2, heads=2, kv_heads=2, vocab=10)


def test_small_model_tp2_by_hand():
    st, = plan_memory(SMALL, Setup(tensor=2, seq_len=4, micro_batch=1, flash_attention=False))
    assert SMALL.masked_per_layer() == 640
    assert st.masked_weights == 640  # 2 layers x 640 / 2 ranks
    # 2 x (320 + 16 norm) + 40 embedding + 8 final norm + 40 output layer = 760 weights, the 40 norm weights float32
    assert st.parameters == 720 * 2 + 40 * 4
    assert st.logits == 3840 and st.logits_grads == 3840  # 640 / 4 x 6 = 960 logits x 4 B
    assert st.optimizer_states == 7680  # AdamW: 2 states
    # probs 1.5 x 4 B, held W*mask and its grad, the fp32 mask of megatron's fused gate/up shard (2 x 16 x 8 / 2)
    assert st.soft_mask == 640 * (6 + 2 + 2) + 4 * 128
    assert (st.param_count, st.logit_count, st.largest_masked) == (760, 960, 128)
    # per token: 4h = 32 replicated + (2h + 2d + 3I) / 2 = 40 + H s / t = 4 -> 76 x 2 B x 4 tokens x 2 layers
    assert st.activations == 1216
    assert st.loss_logits == 4 * 5 * (2 + 4 + 4)
    assert st.total == 1600 + 3840 + 3840 + 7680 + 6912 + 1216 + 200


def test_pipeline_recompute_and_flash_by_hand():
    s0, s1 = plan_memory(SMALL, Setup(pipeline=2, seq_len=4, microbatches=4, recompute=True, flash_attention=False))
    assert (s0.layers, s0.in_flight, s1.in_flight) == (1, 2, 1)  # 1F1B: stage 0 holds PP micro-batches
    assert s0.parameters == (640 + 80) * 2 + 16 * 4 and s1.parameters == (640 + 80) * 2 + (16 + 8) * 4
    layer_input, layer = 2 * 4 * 8, 2 * 4 * (32 + 16 + 16 + 48 + 2 * 4)  # bytes per micro-batch
    assert s0.activations == 2 * layer_input + layer and s1.activations == layer_input + layer
    assert s0.loss_logits == 0 and s1.loss_logits > 0
    flash, = plan_memory(SMALL, Setup(seq_len=4, flash_attention=True))
    eager, = plan_memory(SMALL, Setup(seq_len=4, flash_attention=False))
    assert eager.activations - flash.activations == 2 * 2 * 4 * (2 * 4)  # 2 layers x 2 B x 4 tokens x H s


def test_tied_embedding_counted_once_without_pipeline():
    tied = ModelDims(8, 16, 2, 2, 2, 10, tied_embeddings=True)
    one, = plan_memory(tied, Setup(seq_len=4))
    two = plan_memory(tied, Setup(seq_len=4, pipeline=2))
    assert one.parameters == (2 * 640 + 80) * 2 + (2 * 16 + 8) * 4
    assert two[1].parameters == (640 + 80) * 2 + (16 + 8) * 4  # the last stage keeps its copy of the tied embedding


def test_published_parameter_counts():
    assert round(PRESETS["llama2-7b"].total_params() / 1e9, 2) == 6.74
    assert round(PRESETS["smollm2-135m"].total_params() / 1e6, 1) == 134.5


def test_qwen2_biases_are_parameters_split_like_qkv_rows_and_never_masked():
    biased = ModelDims(hidden=8, intermediate=16, layers=2, heads=2, kv_heads=2, vocab=10, qkv_bias=True)
    assert biased.bias_per_layer() == 8 + 2 * 8 and SMALL.bias_per_layer() == 0
    plain, = plan_memory(SMALL, Setup(tensor=2, seq_len=4))
    with_bias, = plan_memory(biased, Setup(tensor=2, seq_len=4))
    assert with_bias.parameters - plain.parameters == 2 * 24 / 2 * 2  # 2 layers x 24 biases / TP 2 x 2 B
    assert (with_bias.masked_weights, with_bias.logits) == (plain.masked_weights, plain.logits)
    assert biased.total_params() - SMALL.total_params() == 2 * 24


def test_qwen_presets_count_the_gguf_files_parameters(tmp_path):
    # Every tensor of the two GGUF files, counted from their headers (tests/models/test_real_models.py).
    assert PRESETS["qwen2.5-coder-0.5b"].total_params() == 630_167_424
    assert PRESETS["qwen2.5-coder-1.5b"].total_params() == 1_777_088_000
    assert dims_for_source("qwen2.5-coder-0.5b") == PRESETS["qwen2.5-coder-0.5b"]
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "qwen2", "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
        "num_attention_heads": 14, "num_key_value_heads": 2, "vocab_size": 151936, "tie_word_embeddings": False}))
    assert dims_for_source(str(tmp_path)) == PRESETS["qwen2.5-coder-0.5b"]


def test_layouts_that_cannot_split_say_why():
    with pytest.raises(ValueError, match="must divide the 9 attention heads and 3 KV heads.*\\[1, 3\\]"):
        check_layout(PRESETS["smollm2-135m"], Setup(tensor=2))
    with pytest.raises(ValueError, match="must divide the 30 layers"):
        check_layout(PRESETS["smollm2-135m"], Setup(pipeline=4))
    with pytest.raises(ValueError, match="o_proj: its 4 input columns per TP rank are not a multiple of M=8"):
        check_layout(ModelDims(24, 48, 2, 6, 6, 12), Setup(tensor=6, n=2, m=8))
    with pytest.raises(ValueError, match=r"tensor parallel 4 must divide the vocabulary \(10\)"):
        check_layout(ModelDims(8, 16, 2, 4, 4, 10), Setup(tensor=4))


CONFIGS = sorted((ROOT / "configs" / "distributed").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_configs_load_and_their_memory_comment_matches_the_plan(path):
    from compressor.config.base import load_config
    from compressor.parallel.config import DistributedLearnConfig

    cfg = load_config(DistributedLearnConfig, path)
    preset = "nemotron4-15b-class" if "nemotron" in path.stem else None
    stages = plan_memory(dims_for_source(cfg.model.source, preset), setup_from_config(cfg))
    stated = re.search(r"# memory_plan: peak ([\d.]+) (GiB|MiB) per rank", path.read_text())
    assert stated, f"{path.name} has no '# memory_plan: peak ... per rank' line"
    scale = 2**30 if stated.group(2) == "GiB" else 2**20
    assert f"{peak(stages).total / scale:.2f}" == stated.group(1)


def test_cli_prints_the_table(capsys):
    assert main(["--config", str(ROOT / "configs/distributed/llama2_7b_tp8.yaml")]) == 0
    out = capsys.readouterr().out
    assert "TP=8 PP=1 DP=1 (8 ranks)" in out and "peak per rank: 32.91 GiB" in out
    assert main(["--config", str(ROOT / "configs/distributed/llama2_7b_tp8.yaml"), "--recompute"]) == 0
    assert "peak per rank: 28.57 GiB" in capsys.readouterr().out
    assert main(["--config", str(ROOT / "configs/distributed/smollm2_cpu_tp1.yaml"), "--set", "parallel.tensor=2",
                 "--set", "parallel.data=1"]) == 2
    assert "[1, 3]" in capsys.readouterr().err


def test_weight_bytes_follow_the_megatron_model_dtype():
    from compressor.config.base import load_config
    from compressor.parallel.config import DistributedLearnConfig

    tiny = ROOT / "configs/distributed/tiny_tp2.yaml"
    assert setup_from_config(load_config(DistributedLearnConfig, tiny)).weight_bytes == 4
    # bf16 products on megatron (no autocast there) mean a bf16 model, whatever model.dtype says
    cfg = load_config(DistributedLearnConfig, tiny, ["precision.compute=bfloat16"])
    assert (cfg.model.dtype, cfg.megatron_dtype, setup_from_config(cfg).weight_bytes) == ("float32", "bfloat16", 2)
