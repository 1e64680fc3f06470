"""The real Qwen2.5-Coder models of `make models`: GGUF headers, converted folders, a sane forward pass."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from compressor.errors import ModelLoadError
from compressor.models.loading import local_folder, resolve_source

pytestmark = pytest.mark.models

# From the GGUF headers; parameters as loaded (each file has its own output matrix: untied embeddings).
EXPECTED = {
    "qwen2.5-coder-0.5b": dict(layers=24, hidden=896, ffn=4864, heads=14, kv_heads=2, parameters=630_167_424),
    "qwen2.5-coder-1.5b": dict(layers=28, hidden=1536, ffn=8960, heads=12, kv_heads=2, parameters=1_777_088_000),
}
VOCAB = 151936


def gguf_or_skip(alias: str) -> Path:
    try:
        return Path(resolve_source(alias).location)
    except ModelLoadError as exc:
        pytest.skip(f"{alias} is not installed: {exc}")


@pytest.mark.parametrize("alias", EXPECTED)
def test_gguf_header_is_a_qwen2_of_the_expected_size(alias):
    from gguf import GGUFReader

    want = EXPECTED[alias]
    reader = GGUFReader(gguf_or_skip(alias))
    field = lambda key: reader.fields[key].contents()  # noqa: E731
    assert field("general.architecture") == "qwen2"
    assert (field("qwen2.block_count"), field("qwen2.embedding_length"), field("qwen2.feed_forward_length"),
            field("qwen2.attention.head_count"), field("qwen2.attention.head_count_kv")) == (
        want["layers"], want["hidden"], want["ffn"], want["heads"], want["kv_heads"])
    names = {t.name for t in reader.tensors}
    assert {"blk.0.attn_q.bias", "blk.0.attn_k.bias", "blk.0.attn_v.bias", "output.weight"} <= names
    assert "blk.0.attn_output.bias" not in names
    assert sum(int(t.n_elements) for t in reader.tensors) == want["parameters"]


@pytest.mark.parametrize("alias", EXPECTED)
def test_converted_folder_holds_float32_qwen2_with_qkv_biases(alias):
    from safetensors import safe_open

    from compressor.models.lazy import WeightStore
    from compressor.models.loading import load_hf_config

    want = EXPECTED[alias]
    gguf_or_skip(alias)
    folder = local_folder(resolve_source(alias))  # converted once (minutes), then cached
    config = load_hf_config(folder)
    assert (config.model_type, config.num_hidden_layers, config.hidden_size, config.num_attention_heads,
            config.num_key_value_heads, config.vocab_size, config.tie_word_embeddings) == (
        "qwen2", want["layers"], want["hidden"], want["heads"], want["kv_heads"], VOCAB, False)
    store = WeightStore(folder)
    kv = want["kv_heads"] * want["hidden"] // want["heads"]
    for name, size in (("q_proj", want["hidden"]), ("k_proj", kv), ("v_proj", kv)):
        bias = store.get(f"model.layers.0.self_attn.{name}.bias")
        assert bias.shape == (size,) and bias.dtype == torch.float32 and bias.abs().sum() > 0
    assert "model.layers.0.self_attn.o_proj.bias" not in store
    total = 0
    for file in {store._files[n] for n in store.names}:
        with safe_open(file, framework="pt") as fh:
            total += sum(math.prod(fh.get_slice(n).get_shape()) for n in fh.keys())
    assert total == want["parameters"]


def test_small_model_predicts_code():
    from compressor.models import load_model

    gguf_or_skip("qwen2.5-coder-0.5b")
    loaded = load_model("qwen2.5-coder-0.5b")
    code = ("def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n\n\n"
            "def factorial(n):\n    result = 1\n    for i in range(2, n + 1):\n        result *= i\n    return result\n")
    ids = loaded.tokenizer(code, return_tensors="pt", add_special_tokens=False).input_ids
    with torch.no_grad():
        loss = loaded.model(input_ids=ids, labels=ids).loss
    assert math.exp(float(loss)) < 3.0  # a broken dequantization or bias mapping gives hundreds
