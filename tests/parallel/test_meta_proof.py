"""The 15B TP=8 x PP=2 and 7B TP=8 recipes proven rank by rank on the meta device (nothing is allocated, so
these run in seconds), and the proof's checks failing where they should."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from compressor.errors import SparsityPatternError
from compressor.parallel import meta_proof, memory_plan
from compressor.parallel.memory_plan import ModelDims, Setup
from compressor.parallel.meta_proof import RSS_LIMIT, MetaProofError, hf_config_of, prove, prove_config

pytest.importorskip("megatron.core")

ROOT = Path(__file__).resolve().parents[2]
RECIPES = ROOT / "configs" / "distributed"


def recipe(name: str):
    from compressor.config.base import load_config
    from compressor.parallel.config import DistributedLearnConfig

    return load_config(DistributedLearnConfig, RECIPES / name)


def tiny(tp: int = 2, pp: int = 1, **dims) -> tuple:
    """A tiny LLaMA (Qwen2 with qkv_bias) config and a float32 plan for it."""
    d = ModelDims(**{**dict(hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, vocab=96), **dims})
    return hf_config_of(d, max_positions=128), Setup(tensor=tp, pipeline=pp, weight_bytes=4, seq_len=16)


@pytest.fixture(scope="module")
def proof_15b():
    return prove_config(recipe("nemotron4_15b_tp8_pp2.yaml"), preset="nemotron4-15b-class")


def test_15b_tp8_pp2_every_rank_proven(proof_15b):
    p = proof_15b
    assert (p.tp, p.pp, [(r.tp_rank, r.pp_rank) for r in p.ranks]) == (8, 2, [(t, s) for s in (0, 1) for t in range(8)])
    # per layer: 2 x 6144^2 (q, o) + 2 x 1024 x 6144 (k, v) + 3 x 24576 x 6144 (gate, up, down) = 541,065,216
    masked = 16 * 541_065_216 // 8
    embedding = 256_000 * 6144 // 8
    for r in p.ranks:
        last = r.pp_rank == 1
        assert r.layers == range(16 * r.pp_rank, 16 * r.pp_rank + 16)
        assert r.masked_weights == masked == 1_082_130_432
        assert r.logits == masked // 4 * 6 == 1_623_195_648
        assert r.params == 16 * (541_065_216 // 8 + 2 * 6144) + embedding + (6144 if last else 0)
        norms = 16 * 2 * 6144 + (6144 if last else 0)  # megatron's torch RMSNorm: float32 whatever params_dtype
        assert r.weight_bytes == {"bfloat16": 2 * (r.params - norms), "float32": 4 * norms}
        assert r.checkpoint_bytes == {"float32": 3 * 4 * r.logits}  # logits, exp_avg, exp_avg_sq
        assert r.checkpoint_pieces == 3 * 16 * 7  # 7 HF linears a layer
        assert r.largest_masked[1:] == ((2 * 24576 // 8, 6144), (2 * 24576 // 8, 6144 // 4, 6))  # fused gate/up
        assert r.largest_weight == ("output_layer.weight" if last else "embedding.word_embeddings.weight",
                                    (32_000, 6144))
    assert p.hf_tensors == 3 + 32 * 9 and p.masked_hf_weights == 32 * 7
    assert [st.param_count for st in p.stages] == [p.ranks[0].params, p.ranks[8].params]
    assert 0 <= p.rss_growth < RSS_LIMIT


def test_7b_tp8_every_rank_proven():
    p = prove_config(recipe("llama2_7b_tp8.yaml"))
    assert len(p.ranks) == 8 and all(r.figures() == p.ranks[0].figures() for r in p.ranks)
    r = p.ranks[0]
    # per layer 4 x 4096^2 + 3 x 4096 x 11008 = 202,375,168 masked weights
    assert r.masked_weights == 32 * 202_375_168 // 8 == 809_500_672
    assert r.logits == 1_214_251_008
    assert r.params == 32 * (202_375_168 // 8 + 2 * 4096) + 2 * 32_000 * 4096 // 8 + 4096 == 842_534_912
    assert p.stages[0].param_count == r.params and p.stages[0].logit_count == r.logits


def test_table_groups_equal_ranks(proof_15b):
    table = proof_15b.table()
    rows = [line.split() for line in table.splitlines() if line.startswith("0-7")]
    assert [row[:3] for row in rows] == [["0-7", "0", "0-15"], ["0-7", "1", "16-31"]]
    assert rows[0][3] == "1,278,935,040" and rows[1][3] == "1,278,941,184"
    assert "no storage allocated" in table


def test_cli_prints_plan_and_proof(capsys):
    assert memory_plan.main(["--config", str(RECIPES / "llama2_7b_tp8.yaml"), "--prove"]) == 0
    out = capsys.readouterr().out
    assert "peak per rank:" in out and "842,534,912" in out and "equal on every rank" in out


def test_row_parallel_width_not_divisible_by_m_names_the_layer_and_the_fix():
    # intermediate 132 splits over TP=2 into 66 columns per rank: groups of 4 would straddle the shards
    config, setup = tiny(tp=2, intermediate=132)
    with pytest.raises(SparsityPatternError, match=r"decoder\.layers\.0\.mlp\.linear_fc2 \(model\.layers\.0\.mlp\."
                                                   r"down_proj\).* 66 input columns .*M=4.*use tensor_parallel 1$"):
        prove(config, setup, weight_dtype="float32")
    prove(*tiny(tp=1, intermediate=132), weight_dtype="float32")  # whole rows: fine


def test_qwen2_biases_and_pipeline_stages_on_a_tiny_model():
    config, setup = tiny(tp=2, pp=2, qkv_bias=True)
    p = prove(config, setup, weight_dtype="float32")
    per_layer = (64 * 64 * 2 + 32 * 64 * 2 + 3 * 128 * 64) // 2 + (64 + 2 * 32) // 2 + 2 * 64  # weights, biases, norms
    assert [r.params for r in p.ranks] == [per_layer + 96 * 64 // 2] * 2 + [per_layer + 64 + 96 * 64 // 2] * 2


def test_a_planner_that_forgets_the_qkv_biases_is_caught(monkeypatch):
    monkeypatch.setattr(memory_plan.ModelDims, "bias_per_layer", lambda self: 0)
    config, setup = tiny(tp=2, qkv_bias=True)
    with pytest.raises(MetaProofError, match=r"tp 0 pp 0: parameters: planner 43,328, meta model 43,456"):
        prove(config, setup, weight_dtype="float32")


def test_a_wrong_planner_logit_count_is_caught(monkeypatch):
    real = meta_proof.plan_memory

    def off(dims, setup):
        return [dataclasses.replace(st, logit_count=st.logit_count + 6) for st in real(dims, setup)]

    monkeypatch.setattr(meta_proof, "plan_memory", off)
    with pytest.raises(MetaProofError, match=r"tp 1 pp 0: logits: planner 55,302, meta model 55,296"):
        prove(*tiny(tp=2), weight_dtype="float32")


def test_a_conversion_that_loses_a_tensor_is_caught(monkeypatch):
    from compressor.parallel import megatron_convert

    monkeypatch.setattr(megatron_convert, "_LAYER_NORMS", megatron_convert._LAYER_NORMS[:1])
    with pytest.raises(MetaProofError, match=r"model\.layers\.0\.post_attention_layernorm\.weight missing"):
        prove(*tiny(tp=2), weight_dtype="float32")


def test_real_storage_is_caught(monkeypatch):
    import torch

    from compressor.parallel import megatron_model

    build = megatron_model.build_gpt_model

    def with_a_real_norm(*args, **kwargs):
        model = build(*args, **kwargs)
        norm = model.decoder.layers[0].input_layernorm
        norm.weight = torch.nn.Parameter(torch.ones(norm.weight.shape, device="cpu"))
        return model

    monkeypatch.setattr(megatron_model, "build_gpt_model", with_a_real_norm)
    with pytest.raises(MetaProofError, match=r"tensors hold real storage.*decoder\.layers\.0\.input_layernorm\.weight"):
        prove(*tiny(tp=2), weight_dtype="float32")
    monkeypatch.undo()
    with pytest.raises(MetaProofError, match="resident memory grew"):
        prove(*tiny(tp=2), weight_dtype="float32", rss_limit=-1)


def test_checkpoint_pieces_declared_along_the_wrong_dim_are_caught(monkeypatch):
    from compressor.checkpoints.pieces import PieceSpec
    from compressor.parallel import megatron_checkpoint

    real = megatron_checkpoint._pieces

    def all_by_rows(*args):
        return {k: (t, PieceSpec(0, s.rank, s.parts)) for k, (t, s) in real(*args).items()}

    monkeypatch.setattr(megatron_checkpoint, "_pieces", all_by_rows)
    # down_proj is row-parallel: its (64, 16, 6) pieces join along the input groups to (64, 32, 6)
    with pytest.raises(MetaProofError, match=r"model\.layers\.0\.mlp\.down_proj\.weight has shape \(128, 16, 6\), "
                                             r"expected \(64, 32, 6\)"):
        prove(*tiny(tp=2), weight_dtype="float32")


@pytest.mark.parametrize("preset,tp,pp", [("smollm2-135m", 3, 2), ("qwen2.5-coder-0.5b", 2, 2)],
                         ids=["smollm2-tied-tp3-pp2", "qwen2-biases-tp2-pp2"])
def test_other_presets_prove(preset, tp, pp):
    # the tied embedding's copy on the last stage (SmolLM2), Qwen2's q/k/v biases split like their rows
    dims = memory_plan.PRESETS[preset]
    p = prove(hf_config_of(dims), Setup(tensor=tp, pipeline=pp), weight_dtype="bfloat16")
    assert len(p.ranks) == tp * pp and p.stages[-1].param_count == p.ranks[-1].params
    assert sum(r.masked_weights for r in p.ranks) == dims.layers * dims.masked_per_layer()
