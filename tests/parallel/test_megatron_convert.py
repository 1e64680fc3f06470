"""HF LLaMA <-> megatron-core state dicts: exact round trips at every TP x PP layout, and megatron's layouts."""

from __future__ import annotations

import pytest
import torch

from compressor.errors import ConfigError, UnsupportedArchitectureError
from compressor.parallel.megatron_convert import (
    LINEARS, LlamaDims, Shard, check_parallel_sizes, hf_names, hf_to_megatron, merge_to_hf, megatron_to_hf,
    shard_hf, split_local,
)

DIMS = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=8,
            num_key_value_heads=2, max_position_embeddings=256)


def hf_config(model_type: str = "llama", **overrides):
    from transformers import AutoConfig

    return AutoConfig.for_model(model_type, **{**DIMS, **overrides})


def hf_state(tied: bool, model_type: str = "llama") -> tuple[dict[str, torch.Tensor], LlamaDims]:
    from transformers import AutoModelForCausalLM

    config = hf_config(model_type, tie_word_embeddings=tied)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for k in state:  # distinct values everywhere (random init leaves norms at exactly 1)
        state[k] += torch.randn_like(state[k]) * 0.01
    return state, LlamaDims.from_hf_config(config)


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 1), (1, 2), (2, 2)])
def test_hf_megatron_hf_round_trip_is_bit_exact(tied, tp, pp, model_type):
    state, dims = hf_state(tied, model_type)
    shards = {(t, p): hf_to_megatron(state.__getitem__, dims, Shard(tp, t, pp, p))
              for t in range(tp) for p in range(pp)}
    back = megatron_to_hf(shards, dims, tp, pp)
    expected = set(hf_names(dims))
    assert set(back) == expected
    for name in expected:
        assert torch.equal(back[name], state[name]), name
    # Each rank holds 1/tp of every split tensor and a stage holds its own layers only.
    first = shards[(0, 0)]
    assert first["embedding.word_embeddings.weight"].shape == (dims.vocab // tp, dims.hidden)
    assert first["decoder.layers.0.self_attention.linear_qkv.weight"].shape == (dims.qkv_rows // tp, dims.hidden)
    assert first["decoder.layers.0.mlp.linear_fc2.weight"].shape == (dims.hidden, dims.ffn // tp)
    assert sum(k.endswith("linear_qkv.weight") for k in first) == dims.layers // pp
    last = shards[(0, pp - 1)]
    assert ("output_layer.weight" in last) == (not tied or pp > 1)  # tied in one stage: no copy of its own
    if tied and pp > 1:
        assert torch.equal(last["output_layer.weight"], state["model.embed_tokens.weight"].chunk(tp)[0])


def test_fused_qkv_follows_megatron_query_group_layout():
    state, dims = hf_state(False)
    tp = 2
    q, k, v = (state[f"model.layers.1.self_attn.{n}_proj.weight"] for n in "qkv")
    d, r = dims.head_dim, dims.q_per_group  # 8 heads in 2 query groups: 4 q heads per group
    for rank in range(tp):
        shard = hf_to_megatron(state.__getitem__, dims, Shard(tp, rank, 1, 0))
        local = shard["decoder.layers.1.self_attention.linear_qkv.weight"]
        # TP rank `rank` holds query group g = rank: its 4 q heads, then k head g, then v head g.
        g = rank
        assert torch.equal(local[: r * d], q[g * r * d: (g + 1) * r * d])
        assert torch.equal(local[r * d: (r + 1) * d], k[g * d: (g + 1) * d])
        assert torch.equal(local[(r + 1) * d:], v[g * d: (g + 1) * d])


def test_qwen2_qkv_bias_is_fused_in_the_query_group_layout_of_the_rows():
    state, dims = hf_state(False, "qwen2")
    assert dims.qkv_bias and not hf_state(False)[1].qkv_bias
    q, k, v = (state[f"model.layers.1.self_attn.{n}_proj.bias"] for n in "qkv")
    d, r = dims.head_dim, dims.q_per_group
    for rank in range(2):
        shard = hf_to_megatron(state.__getitem__, dims, Shard(2, rank, 1, 0))
        bias = shard["decoder.layers.1.self_attention.linear_qkv.bias"]
        assert bias.shape == (dims.qkv_rows // 2,)
        assert torch.equal(bias[: r * d], q[rank * r * d: (rank + 1) * r * d])
        assert torch.equal(bias[r * d: (r + 1) * d], k[rank * d: (rank + 1) * d])
        assert torch.equal(bias[(r + 1) * d:], v[rank * d: (rank + 1) * d])
        # No other linear has a bias (o_proj and the MLP are bias-free in Qwen2).
        assert [n for n in shard if n.endswith(".bias")] == [f"decoder.layers.{i}.self_attention.linear_qkv.bias"
                                                               for i in range(dims.layers)]


def test_fused_fc1_is_gate_then_up_per_rank():
    state, dims = hf_state(False)
    gate, up = state["model.layers.0.mlp.gate_proj.weight"], state["model.layers.0.mlp.up_proj.weight"]
    local = hf_to_megatron(state.__getitem__, dims, Shard(2, 1, 1, 0))["decoder.layers.0.mlp.linear_fc1.weight"]
    half = dims.ffn // 2
    assert torch.equal(local[:half], gate[half:]) and torch.equal(local[half:], up[half:])
    down = hf_to_megatron(state.__getitem__, dims, Shard(2, 1, 1, 0))["decoder.layers.0.mlp.linear_fc2.weight"]
    assert torch.equal(down, state["model.layers.0.mlp.down_proj.weight"][:, half:])  # row-parallel: input columns


@pytest.mark.parametrize("kind", LINEARS, ids=[k.path for k in LINEARS])
def test_row_maps_move_logits_like_weights(kind):
    # Logits (out, in/M, C): the same map on rows / groups of columns; shard then merge is exact.
    _, dims = hf_state(False)
    tp = 2
    shapes = {"self_attn.q_proj": (64, 64), "self_attn.k_proj": (16, 64), "self_attn.v_proj": (16, 64),
              "self_attn.o_proj": (64, 64), "mlp.gate_proj": (128, 64), "mlp.up_proj": (128, 64),
              "mlp.down_proj": (64, 128)}
    full = [torch.randn(shapes[h][0], shapes[h][1] // 4, 6) for h in kind.hf]
    per_rank = [shard_hf(kind, full, dims, tp, r) for r in range(tp)]
    for merged, original in zip(merge_to_hf(kind, per_rank, dims), full):
        assert torch.equal(merged, original)
    assert sum(p.numel() for p in split_local(kind, per_rank[0], dims, tp)) * tp == sum(t.numel() for t in full)


def test_layout_that_does_not_divide_names_the_dimension():
    _, dims = hf_state(False)
    with pytest.raises(ConfigError, match=r"num_key_value_heads.*tensor_parallel=4"):
        check_parallel_sizes(dims, 4, 1)
    with pytest.raises(ConfigError, match=r"num_hidden_layers=4 is not divisible by pipeline_parallel=3"):
        check_parallel_sizes(dims, 1, 3)
    check_parallel_sizes(dims, 2, 4)


@pytest.mark.parametrize("overrides,match", [
    (dict(attention_bias=True), "attention_bias"),
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}), "RoPE scaling"),
])
def test_unmapped_architectures_are_refused(overrides, match):
    with pytest.raises(UnsupportedArchitectureError, match=match):
        LlamaDims.from_hf_config(hf_config(**overrides))


def test_dims_read_rope_theta_and_gqa():
    dims = LlamaDims.from_hf_config(hf_config(rope_parameters={"rope_type": "default", "rope_theta": 5e5}))
    assert (dims.rope_theta, dims.kv_heads, dims.q_per_group, dims.head_dim) == (5e5, 2, 4, 8)
