"""MaskLLM on a Qwen2 (q/k/v biases): masks reach weights only, biases stay dense, frozen and unchanged."""

import pytest
import torch
from torch import nn

from compressor.methods.maskllm import (
    MaskLLMConfig, attach_masks, hold_samples, mask_train, remove_masks, set_schedule_state, step_surrogate,
)

LINEARS = [f"model.layers.{i}.{p}" for i in range(2) for p in
           ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
            "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
IDS = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))


def _tiny_qwen2() -> nn.Module:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=256)
    model = Qwen2ForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0.0, 0.1)  # transformers starts them at zero
    return model


@pytest.mark.parametrize("train_weights", [False, True])
def test_biases_get_no_mask_and_no_gradient(train_weights):
    model = _tiny_qwen2()
    biases = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith(".bias")}
    assert len(biases) == 6
    masks = attach_masks(model, LINEARS, MaskLLMConfig(sparsity="2:4", train_weights=train_weights))
    mask_train(masks, True)
    set_schedule_state(masks, 2.0, 100.0)
    hold_samples(model, masks)
    model(input_ids=IDS, labels=IDS).loss.backward()
    step_surrogate(masks, 1e-3).backward()
    for name in biases:
        bias = model.get_parameter(name)
        assert not bias.requires_grad and bias.grad is None, name
    assert all(m.logits.grad is not None for m in masks.values())


def test_hard_masks_are_biased_linears_with_masked_weights_and_baking_keeps_biases():
    model = _tiny_qwen2()
    dense = {n: p.detach().clone() for n, p in model.named_parameters()}
    masks = attach_masks(model, LINEARS, MaskLLMConfig(sparsity="2:4"))
    mask_train(masks, False)
    hard = {name: m.hard_mask() for name, m in masks.items()}
    q = "model.layers.0.self_attn.q_proj"
    x = torch.randn(3, 64)
    with torch.no_grad():
        expected = nn.functional.linear(x, dense[f"{q}.weight"] * hard[q], dense[f"{q}.bias"])
        torch.testing.assert_close(model.get_submodule(q)(x), expected, rtol=0, atol=0)
        with_masks = model(input_ids=IDS).logits
    removed = remove_masks(model)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=IDS).logits, with_masks, rtol=0, atol=0)
    for name, value in dense.items():
        if name.endswith(".bias"):
            assert torch.equal(model.get_parameter(name), value), name
        elif name.rsplit(".", 1)[0] in removed:
            assert torch.equal(model.get_parameter(name), value * removed[name.rsplit(".", 1)[0]]), name
