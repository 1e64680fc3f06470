"""Weights on demand for a Qwen2 (q/k/v biases): a meta model filled block by block equals the eager one,
and a lazy prune writes the biases through unchanged."""

import torch
import yaml

from compressor.models import load_model
from compressor.models.layers import block_prefix, decoder_blocks
from compressor.models.lazy import WeightStore, materialize, materialize_outer, release


def test_meta_model_filled_block_by_block_equals_the_eager_model(tiny_qwen2_dir):
    eager = load_model(str(tiny_qwen2_dir))
    lazy = load_model(str(tiny_qwen2_dir), empty=True)
    store = WeightStore(lazy.folder)
    materialize_outer(lazy.model, lazy.arch, store, torch.float32)
    blocks = decoder_blocks(lazy.model, lazy.arch)
    for k, block in enumerate(blocks):
        materialize(block, block_prefix(lazy.arch, k), store, torch.float32)
        assert block.self_attn.q_proj.bias is not None and not block.self_attn.q_proj.bias.is_meta
    want = eager.model.state_dict()
    got = lazy.model.state_dict()
    assert got.keys() == want.keys() and any(k.endswith("v_proj.bias") for k in got)
    for name, value in want.items():
        assert torch.equal(got[name], value), name
    ids = torch.randint(0, 49152, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(lazy.model(ids).logits, eager.model(ids).logits, rtol=0, atol=0)
    release(blocks[0])
    assert blocks[0].self_attn.k_proj.bias.is_meta


def test_lazy_prune_of_a_qwen2_writes_its_biases_unchanged(tmp_path, tiny_qwen2_dir, text_file):
    from compressor.cli import main

    cfg = {"model": {"source": str(tiny_qwen2_dir), "lazy": True}, "sparsity": "2:4", "method": "sparsegpt",
           "calibration": {"data": {"source": str(text_file)}, "num_windows": 4, "seq_len": 64, "batch_size": 4},
           "evaluation": {"enabled": False}, "executor": {"kind": "inprocess"}}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["prune", "--config", str(tmp_path / "cfg.yaml"), "--output", str(tmp_path / "run")]) == 0
    dense = load_model(str(tiny_qwen2_dir)).model.state_dict()
    pruned = load_model(str(tmp_path / "run" / "model")).model.state_dict()
    assert pruned.keys() == dense.keys()
    biases = [n for n in dense if n.endswith(".bias")]
    assert len(biases) == 3 * 2  # q, k, v of 2 layers
    for name in biases:
        assert torch.equal(pruned[name], dense[name]), name
    assert not torch.equal(pruned["model.layers.1.self_attn.q_proj.weight"], dense["model.layers.1.self_attn.q_proj.weight"])
