"""Export of a 2:4 Qwen2 (q/k/v biases): the biases are stored dense and come back bit for bit."""

import shutil

import torch

from compressor.checkpoints.convert import ExportOptions, convert_checkpoint
from compressor.checkpoints.load import load_compressed_model, read_state_dict
from compressor.checkpoints.masks import save_masks
from compressor.checkpoints.sharded import read_manifest
from compressor.sparsity import NM
from tests.checkpoints.conftest import magnitude_masks, same_bits


def test_compressed_qwen2_round_trip_keeps_biases_dense(tiny_qwen2_dir, tmp_path):
    from safetensors.torch import load_file

    from compressor.models import load_model

    dense = load_file(str(tiny_qwen2_dir / "model.safetensors"))
    masks = magnitude_masks(dense, NM(2, 4))
    biases = sorted(n for n in dense if n.endswith(".bias"))
    assert len(biases) == 6 and not set(biases) & set(masks)
    run = tmp_path / "run"
    shutil.copytree(tiny_qwen2_dir, run / "model")  # a run folder: the dense model and its masks
    save_masks(run / "masks.safetensors", masks, "2:4")
    out = tmp_path / "compressed"
    summary = convert_checkpoint(run, out, ExportOptions(shard_size="100KB"))

    manifest = read_manifest(out)
    assert summary.sparse_layers == 14 and sorted(manifest["sparse_layers"]) == sorted(masks)
    state = read_state_dict(out)
    for name in biases:
        assert same_bits(state[name], dense[name]), name
    for name, mask in masks.items():
        assert same_bits(state[name], dense[name] * mask), name

    model = load_compressed_model(out)
    reference = load_model(str(tiny_qwen2_dir)).model
    with torch.no_grad():
        for name, mask in masks.items():
            reference.get_parameter(name).mul_(mask)
        ids = torch.randint(0, 49152, (1, 10), generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=0, atol=0)
    assert torch.equal(model.get_parameter(biases[0]), dense[biases[0]])
