"""The learnable N:M mask: patterns, hard/soft masks, priors, gradients, baking back."""

from math import comb

import pytest
import torch
from torch import nn

from compressor.errors import SparsityPatternError
from compressor.methods.maskllm import (
    MaskLLMConfig, Schedule, attach_masks, mask_memory_bytes, mask_stats, mask_train, remove_masks,
    set_schedule_state, sparse_weight_regularizer,
)
from compressor.methods.maskllm.gumbel import gumbel_softmax_probs, hard_mask, soft_mask
from compressor.methods.maskllm.mask import NMMaskParametrization
from compressor.methods.magnitude import magnitude_mask
from compressor.sparsity import NM, is_nm, nm_patterns


@pytest.mark.parametrize("nm", [NM(1, 4), NM(2, 4), NM(2, 8), NM(4, 8)], ids=str)
def test_patterns_and_hard_masks_are_valid(nm):
    patterns = nm_patterns(nm)
    assert patterns.shape == (comb(nm.m, nm.n), nm.m)
    assert (patterns.sum(1) == nm.n).all() and len({tuple(p.tolist()) for p in patterns}) == patterns.shape[0]
    logits = torch.randn(5, 16 // nm.m, patterns.shape[0])
    mask = hard_mask(logits, patterns.float())
    assert mask.shape == (5, 16) and is_nm(mask, nm) and (mask.reshape(5, -1, nm.m).sum(-1) == nm.n).all()


def test_cold_large_kappa_soft_mask_equals_hard_mask():
    patterns = nm_patterns(NM(2, 4)).float()
    logits = torch.randn(8, 4, 6)
    probs = gumbel_softmax_probs(logits, tau=1e-3, kappa=1e4, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(soft_mask(probs, patterns), hard_mask(logits, patterns).float(), atol=1e-5, rtol=0)
    warm = soft_mask(gumbel_softmax_probs(logits, tau=4.0, kappa=1.0), patterns)
    assert ((warm > 0.05) & (warm < 0.95)).any()  # a warm sample is genuinely soft
    torch.testing.assert_close(warm.reshape(8, 4, 4).sum(-1), torch.full((8, 4), 2.0))  # still N per group in expectation


def test_gumbel_samples_are_reproducible_from_a_seed():
    logits = torch.randn(3, 4, 6)
    a = gumbel_softmax_probs(logits, 1.0, 100.0, torch.Generator().manual_seed(7))
    b = gumbel_softmax_probs(logits, 1.0, 100.0, torch.Generator().manual_seed(7))
    assert torch.equal(a, b) and torch.isfinite(a).all()


def test_prior_moves_the_argmax_and_strength_zero_does_nothing():
    w = torch.randn(16, 32)
    prior = magnitude_mask(w, NM(2, 4))
    strong = NMMaskParametrization(16, 32, NM(2, 4), seed=1)
    chance = (strong.hard_mask() == prior).reshape(16, 8, 4).all(-1).float().mean()
    strong.init_from_prior(prior, 3.0)
    agree = (strong.hard_mask() == prior).reshape(16, 8, 4).all(-1).float().mean()
    assert agree > 0.9 and chance < 0.4  # a random start agrees with 1 group in 6
    huge = NMMaskParametrization(16, 32, NM(2, 4), seed=1)
    huge.init_from_prior(prior, 20.0)
    assert torch.equal(huge.hard_mask(), prior)
    none = NMMaskParametrization(16, 32, NM(2, 4), seed=1)
    before = none.logits.detach().clone()
    none.init_from_prior(prior, 0.0)
    assert torch.equal(none.logits, before)
    with pytest.raises(SparsityPatternError, match="prior mask has shape"):
        strong.init_from_prior(prior[:, :16], 3.0)
    with pytest.raises(SparsityPatternError, match="layer"):
        NMMaskParametrization(4, 30, NM(2, 4))


def test_schedules():
    s = Schedule(start=4.0, end=0.05)
    assert s.value_at(0, 100) == 4.0 and s.value_at(99, 100) == pytest.approx(0.05)
    c = Schedule(start=100.0, end=500.0, kind="cosine")
    assert c.value_at(0, 11) == 100.0 and c.value_at(5, 11) == pytest.approx(300.0) and c.value_at(10, 11) == 500.0
    with pytest.raises(ValueError, match="tau"):
        MaskLLMConfig(tau={"start": 1.0, "end": 0.0})
    with pytest.raises(ValueError, match="patterns"):
        MaskLLMConfig(sparsity="8:16")


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=256)
    return LlamaForCausalLM(cfg)


LINEARS = [f"model.layers.{i}.{p}" for i in range(2) for p in
           ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
            "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]


def test_gradients_reach_the_logits_only():
    model = _tiny_llama()
    masks = attach_masks(model, LINEARS, MaskLLMConfig())
    mask_train(masks, True)
    set_schedule_state(masks, 2.0, 100.0)
    ids = torch.randint(0, 256, (2, 16))
    loss = model(input_ids=ids, labels=ids).loss - 1e-3 * sparse_weight_regularizer(masks)
    loss.backward()
    for m in masks.values():
        assert m.logits.grad is not None and m.logits.grad.abs().sum() > 0
    assert all(p.grad is None for n, p in model.named_parameters() if "logits" not in n)
    assert mask_memory_bytes(masks)["logits"] == pytest.approx(6 / 4 * 4)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_eval_mode_equals_hard_masked_linear_and_bakes_back(dtype):
    model = _tiny_llama()
    dense = {n: model.get_submodule(n).weight.detach().clone() for n in LINEARS}
    masks = attach_masks(model, LINEARS, MaskLLMConfig(logits_dtype=dtype))
    assert masks[LINEARS[0]].logits.dtype == getattr(torch, dtype)
    mask_train(masks, False)
    ids = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        masked_out = model(input_ids=ids).logits
    hard = {n: m.hard_mask() for n, m in masks.items()}
    stats = mask_stats(masks, {n: m.argmax_patterns() for n, m in masks.items()})
    assert stats["flip_rate"] == 0 and 1 / 6 <= stats["max_prob"] <= 1
    remove_masks(model, bake=True)
    for n in LINEARS:
        linear = model.get_submodule(n)
        assert type(linear) is nn.Linear and not hasattr(linear, "parametrizations")
        torch.testing.assert_close(linear.weight, dense[n] * hard[n])
        assert is_nm(linear.weight, NM(2, 4))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, masked_out)
