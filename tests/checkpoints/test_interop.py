"""Other readers understand our files: an independent decoder from the format's description, and compressed-tensors."""

import json

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file as load_numpy

from tests.checkpoints.conftest import same_bits


def decode_sparse_24_bitmask(folder) -> dict[str, np.ndarray]:
    """The format as documented, with numpy only: <layer>.shape (2, 1) int64, <layer>.bitmask (rows, ceil(cols/8))
    uint8, one bit per weight, LSB first along the row; <layer>.compressed (rows, cols/2): the kept values in
    row-major order. Everything else is stored as is."""
    config = json.loads((folder / "config.json").read_text())
    sparsity = config["quantization_config"]["sparsity_config"]
    assert config["quantization_config"]["quant_method"] == "compressed-tensors"
    assert sparsity["format"] == "sparse-24-bitmask" and sparsity["sparsity_structure"] == "2:4"
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    stored: dict[str, np.ndarray] = {}
    for shard in sorted(set(index["weight_map"].values())):
        stored.update(load_numpy(str(folder / shard)))
    out = {}
    for key, value in stored.items():
        if key.endswith(".bitmask"):
            prefix = key[: -len(".bitmask")]
            rows, cols = (int(v) for v in stored[f"{prefix}.shape"].reshape(-1))
            bits = np.unpackbits(value, axis=-1, bitorder="little")[:, :cols].astype(bool)
            assert (bits.reshape(rows, cols // 4, 4).sum(-1) == 2).all()
            dense = np.zeros((rows, cols), dtype=stored[f"{prefix}.compressed"].dtype)
            dense[bits] = stored[f"{prefix}.compressed"].reshape(-1)
            out[f"{prefix}.weight"] = dense
        elif not key.endswith((".shape", ".compressed")):
            out[key] = value
    return out


@pytest.mark.parametrize("which", ["float32", "float16"])
def test_independent_decoder_reads_our_files(compressed_dir, pruned_dir, pruned_state, tmp_path, which):
    from compressor.checkpoints.convert import ExportOptions, convert_checkpoint

    folder = compressed_dir
    if which == "float16":  # numpy has no bfloat16; float16 exercises the 2-byte layout
        folder = tmp_path / "fp16"
        convert_checkpoint(pruned_dir, folder, ExportOptions(dtype="float16", shard_size="300KB"))
    decoded = decode_sparse_24_bitmask(folder)
    assert set(decoded) == set(pruned_state)
    for name, value in pruned_state.items():
        assert same_bits(torch.from_numpy(decoded[name]), value.to(getattr(torch, which))), name


def test_compressed_tensors_decompresses_our_checkpoint(compressed_dir, pruned_dir, pruned_state, tmp_path):
    pytest.importorskip("compressed_tensors", reason="pip install --no-deps compressed-tensors==0.14.0 loguru")
    from compressed_tensors.compressors import ModelCompressor
    from transformers import AutoConfig, AutoModelForCausalLM

    from compressor.checkpoints.convert import ExportOptions, convert_checkpoint

    folder = tmp_path / "bf16"
    convert_checkpoint(pruned_dir, folder, ExportOptions(dtype="bfloat16", shard_size="300KB"))
    compressor = ModelCompressor.from_pretrained(str(folder))
    assert type(compressor.sparsity_compressor).__name__ == "Sparse24BitMaskCompressor"
    assert compressor.quantization_config is None
    weights = dict(compressor.sparsity_compressor.decompress(str(folder)))
    assert set(weights) == set(pruned_state)
    assert all(same_bits(weights[k], v.to(torch.bfloat16)) for k, v in pruned_state.items())
    # and into a model: its logits are the dense-with-zeros model's
    config = AutoConfig.from_pretrained(folder)
    del config.quantization_config  # transformers 5 only accepts compressed-tensors >= 0.15, which dropped 2:4
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    compressor.decompress(str(folder), model)
    reference = AutoModelForCausalLM.from_pretrained(pruned_dir, dtype=torch.bfloat16).eval()
    ids = torch.randint(0, config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)
