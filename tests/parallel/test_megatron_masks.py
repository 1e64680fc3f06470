"""Sharded masks on megatron's parallel linears, in one process: each TP rank is simulated by a stand-in
model whose linears have that rank's weight shapes at megatron's module paths."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from compressor.errors import ConfigError, SparsityPatternError
from compressor.methods.maskllm import MaskLLMConfig, attach_masks
from compressor.parallel.megatron_convert import LINEARS, LlamaDims
from compressor.parallel.megatron_masks import (
    assemble, attach_sharded_masks, check_tp_mask_shapes, hf_linear_shape, load_hf_logits, local_pieces, local_shape,
    select_linears,
)
from compressor.parallel.megatron_model import Layout
from compressor.sparsity import NM, is_nm, patterns_to_mask
from compressor.sparsity.plan import PlanError

NM24 = NM(2, 4)


def dims(ffn: int = 128, layers: int = 2, kv_heads: int = 2) -> LlamaDims:
    return LlamaDims(hidden=64, heads=4, kv_heads=kv_heads, head_dim=16, ffn=ffn, layers=layers, vocab=96, tied=False,
                     norm_eps=1e-6, rope_theta=1e4, max_positions=128)


def layout(tp: int = 1, tp_rank: int = 0, pp: int = 1, pp_rank: int = 0) -> Layout:
    return Layout(tp_size=tp, tp_rank=tp_rank, pp_size=pp, pp_rank=pp_rank, dp_size=1, dp_rank=0)


def linear_tree(shapes: dict[str, tuple[int, int]]) -> nn.Module:
    """A module tree with a bias-free nn.Linear (out, in) at each dotted path."""
    root = nn.Module()
    for path, (out, inp) in shapes.items():
        parent = root
        *parents, leaf = path.split(".")
        for part in parents:
            if not hasattr(parent, part):
                parent.add_module(part, nn.Module())
            parent = getattr(parent, part)
        parent.add_module(leaf, nn.Linear(inp, out, bias=False))
    return root


def stage_model(d: LlamaDims, lay: Layout) -> nn.Module:
    """Stand-ins at megatron's paths with the rank's shard shapes (parametrizations work the same)."""
    return linear_tree({f"decoder.layers.{local}.{kind.path}": local_shape(kind, d, lay.tp_size)
                        for local, _ in enumerate(lay.shard.layers(d)) for kind in LINEARS})


def hf_names(d: LlamaDims) -> list[str]:
    rels = [h for kind in LINEARS for h in kind.hf]
    return [f"model.layers.{i}.{rel}" for i in range(d.layers) for rel in rels]


def gathered(masks_per_rank, d, tp, tensor_of) -> dict[str, torch.Tensor]:
    pieces = [p for r, masks in enumerate(masks_per_rank) for p in local_pieces(masks, d, layout(tp, r), tensor_of)]
    return assemble(pieces)


def test_group_straddling_a_tp_shard_boundary_is_refused_by_name():
    d = dims(ffn=132)  # 132 columns of down_proj: 66 per rank at TP=2, not a multiple of 4
    check_tp_mask_shapes(d, 1, NM24)  # one rank: fine
    with pytest.raises(SparsityPatternError, match=r"decoder\.layers\.0\.mlp\.linear_fc2 \(model\.layers\.0\.mlp\."
                                                   r"down_proj\).*132.*tensor_parallel=2.*66 columns per rank"):
        check_tp_mask_shapes(d, 2, NM24)
    lay = layout(2, 0)
    with pytest.raises(SparsityPatternError, match="linear_fc2"):  # the real entry point checks before attaching
        attach_sharded_masks(stage_model(d, lay), d, lay, MaskLLMConfig(sparsity="2:4"))


@pytest.mark.parametrize("tp", [2, 4])
def test_sharded_initial_logits_are_the_single_process_logits(tp):
    d = dims(kv_heads=tp)  # TP=4 needs 4 query groups
    cfg = MaskLLMConfig(sparsity="2:4")
    per_rank = [attach_sharded_masks(stage_model(d, layout(tp, r)), d, layout(tp, r), cfg, seed=7) for r in range(tp)]
    full = gathered(per_rank, d, tp, lambda m: m.logits.detach())

    hf_model = linear_tree({n: hf_linear_shape(n.split(".", 3)[-1], d) for n in hf_names(d)})
    single = attach_masks(hf_model, hf_names(d), cfg, seed=7)
    assert set(full) == {f"{n}.weight" for n in single}
    for name, mask in single.items():
        assert torch.equal(full[f"{name}.weight"], mask.logits.detach()), name
    # Noise generators differ per shard (and from one TP size to another).
    seeds = {s.mask.seed for masks in per_rank for s in masks.values()}
    assert len(seeds) == tp * len(per_rank[0])


def test_priors_are_sharded_like_weights():
    d, tp = dims(), 2
    gen = torch.Generator().manual_seed(0)
    priors = {}
    for name in hf_names(d):
        out, inp = hf_linear_shape(name.split(".", 3)[-1], d)
        priors[f"{name}.weight"] = patterns_to_mask(torch.randint(0, 6, (out, inp // 4), generator=gen), NM24)
    cfg = MaskLLMConfig(sparsity="2:4", prior_strength=50.0)  # strong enough that the prior is every argmax
    per_rank = [attach_sharded_masks(stage_model(d, layout(tp, r)), d, layout(tp, r), cfg, priors=priors)
                for r in range(tp)]
    hard = gathered(per_rank, d, tp, lambda m: m.hard_mask())
    for name, prior in priors.items():
        assert torch.equal(hard[name], prior), name


def test_load_hf_logits_round_trips_through_shards():
    d, tp = dims(), 2
    cfg = MaskLLMConfig(sparsity="2:4")
    per_rank = [attach_sharded_masks(stage_model(d, layout(tp, r)), d, layout(tp, r), cfg) for r in range(tp)]
    target = {k: torch.randn_like(v) for k, v in gathered(per_rank, d, tp, lambda m: m.logits.detach()).items()}
    for r, masks in enumerate(per_rank):
        load_hf_logits(masks, target, d, layout(tp, r))
    back = gathered(per_rank, d, tp, lambda m: m.logits.detach())
    assert all(torch.equal(back[k], target[k]) for k in target)
    with pytest.raises(ConfigError, match="no entry for model.layers.0.self_attn.q_proj.weight"):
        load_hf_logits(per_rank[0], {}, d, layout(tp, 0))


def test_pipeline_stage_masks_its_own_layers_with_global_names():
    d = dims(layers=4)
    lay = layout(1, 0, pp=2, pp_rank=1)
    masks = attach_sharded_masks(stage_model(d, lay), d, lay, MaskLLMConfig(sparsity="2:4"))
    assert sorted({s.layer for s in masks.values()}) == [2, 3]
    s = masks["decoder.layers.2.self_attention.linear_qkv"]
    assert s.module_path == "decoder.layers.0.self_attention.linear_qkv"
    assert s.hf_weights == tuple(f"model.layers.2.self_attn.{p}_proj.weight" for p in "qkv")


def test_targets_select_whole_fused_linears():
    d = dims()
    chosen = select_linears(d, [0, 1], targets=[".*"], ignore=[r".*\.mlp\..*"])
    assert [k.path for _, k in chosen] == ["self_attention.linear_qkv", "self_attention.linear_proj"] * 2
    with pytest.raises(ConfigError, match=r"q_proj, .*k_proj, .*v_proj.*fuses them into decoder\.layers\.0"):
        select_linears(d, [0], targets=[".*"], ignore=[r".*k_proj"])


def plan_levels(d: LlamaDims) -> dict[str, NM]:
    """A mixed plan by HF module name: attention 4:8 (q, k, v share it: one fused mask), layer 1's MLP
    1:4 for gate/up and 4:8 for down, the rest 2:4."""
    def level(name: str) -> NM:
        if ".self_attn." in name:
            return NM(4, 8)
        if name.startswith("model.layers.1.mlp."):
            return NM(4, 8) if name.endswith("down_proj") else NM(1, 4)
        return NM24
    return {n: level(n) for n in hf_names(d)}


def test_mixed_levels_shard_to_the_single_process_logits():
    d, tp = dims(), 2
    levels = plan_levels(d)
    cfg = MaskLLMConfig(sparsity="2:4")
    per_rank = [attach_sharded_masks(stage_model(d, layout(tp, r)), d, layout(tp, r), cfg, seed=3, levels=levels)
                for r in range(tp)]
    full = gathered(per_rank, d, tp, lambda m: m.logits.detach())
    hf_model = linear_tree({n: hf_linear_shape(n.split(".", 3)[-1], d) for n in hf_names(d)})
    single = attach_masks(hf_model, hf_names(d), cfg, seed=3, levels=levels)
    for name, mask in single.items():
        nm = levels[name]
        assert full[f"{name}.weight"].shape[-2:] == (mask.logits.shape[1], math.comb(nm.m, nm.n)), name
        assert torch.equal(full[f"{name}.weight"], mask.logits.detach()), name
    hard = gathered(per_rank, d, tp, lambda m: m.hard_mask())
    for name, nm in levels.items():
        assert is_nm(hard[f"{name}.weight"], nm), name


def test_fused_linears_with_different_levels_are_refused_by_name():
    d = dims()
    levels = {**plan_levels(d), "model.layers.0.self_attn.k_proj": NM24}
    lay = layout(1, 0)
    with pytest.raises(PlanError, match=r"fuses into decoder\.layers\.0\.self_attention\.linear_qkv different levels "
                                        r"\(model\.layers\.0\.self_attn\.q_proj 4:8, model\.layers\.0\.self_attn\.k_proj"
                                        r" 2:4, .*give them one level"):
        attach_sharded_masks(stage_model(d, lay), d, lay, MaskLLMConfig(sparsity="2:4"), levels=levels)


def test_a_levels_m_must_tile_the_tp_shard():
    d = dims(ffn=136)  # down_proj: 68 columns per rank at TP=2, a multiple of 4 but not of 8
    levels = {**plan_levels(d), "model.layers.1.mlp.down_proj": NM(4, 8)}
    lay = layout(2, 0)
    with pytest.raises(SparsityPatternError, match=r"decoder\.layers\.1\.mlp\.linear_fc2 .*68 columns per rank, not "
                                                   r"a multiple of M=8"):
        attach_sharded_masks(stage_model(d, lay), d, lay, MaskLLMConfig(sparsity="2:4"), levels=levels)
