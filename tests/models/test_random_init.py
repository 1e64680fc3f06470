"""Random tiny models: a Qwen2 gets non-zero q/k/v biases (and nothing else gets any), and its adapter says so."""

import torch

from compressor.models import load_model


def test_tiny_qwen2_has_random_qkv_biases_and_llama_none(tiny_qwen2_dir, tiny_llama_dir):
    qwen = load_model(str(tiny_qwen2_dir))
    biases = {n: p for n, p in qwen.model.named_parameters() if n.endswith(".bias")}
    assert sorted(biases) == sorted(f"model.layers.{i}.self_attn.{p}_proj.bias" for i in range(2) for p in "qkv")
    assert all(float(b.detach().std()) > 0.05 for b in biases.values())
    assert qwen.arch.family == "qwen2" and qwen.arch.qkv_bias
    llama = load_model(str(tiny_llama_dir))
    assert not llama.arch.qkv_bias and not any(n.endswith(".bias") for n, _ in llama.model.named_parameters())


def test_same_seed_same_model(tmp_path):
    from tests.factories import make_tiny_qwen2

    a, b = make_tiny_qwen2(tmp_path / "a", seed=1), make_tiny_qwen2(tmp_path / "b", seed=1)
    sa, sb = load_model(str(a)).model.state_dict(), load_model(str(b)).model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
