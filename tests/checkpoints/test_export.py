"""Exports of the tiny LLaMA: layout, index, manifest, round trips, loaded logits, masks and logits of runs."""

import hashlib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from compressor.checkpoints.convert import ExportOptions, convert_checkpoint
from compressor.checkpoints.load import load_compressed_model, read_state_dict
from compressor.checkpoints.logits import save_logits
from compressor.checkpoints.masks import save_masks
from compressor.config.base import validate_config
from compressor.errors import CheckpointError, ConfigError, SparsityPatternError
from compressor.sparsity import NM, nm_patterns
from tests.checkpoints.conftest import is_linear, magnitude_masks, same_bits

ROOT = Path(__file__).resolve().parents[2]


def shard_keys(path: Path) -> set[str]:
    with safe_open(str(path), framework="pt") as fh:
        return set(fh.keys())


def test_index_manifest_config_and_copied_files(compressed_dir, pruned_dir, pruned_state):
    index = json.loads((compressed_dir / "model.safetensors.index.json").read_text())
    manifest = json.loads((compressed_dir / "manifest.json").read_text())
    shards = sorted(p.name for p in compressed_dir.glob("*.safetensors"))
    assert len(shards) >= 3 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert [s["file"] for s in manifest["shards"]] == shards
    total = 0
    for entry in manifest["shards"]:
        path = compressed_dir / entry["file"]
        assert entry["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
        assert entry["bytes"] == path.stat().st_size
        keys = shard_keys(path)
        assert keys == {k for k, f in index["weight_map"].items() if f == entry["file"]}
        with safe_open(str(path), framework="pt") as fh:
            total += sum(fh.get_tensor(k).nbytes for k in keys)
    assert index["metadata"]["total_size"] == manifest["total_tensor_bytes"] == total
    linears = sorted(k for k in pruned_state if is_linear(k))
    assert len(linears) == 14 and sorted(manifest["sparse_layers"]) == linears
    expected = {k for k in pruned_state if not is_linear(k)}
    expected |= {k[: -len("weight")] + s for k in linears for s in ("compressed", "bitmask", "shape")}
    assert set(index["weight_map"]) == expected
    assert manifest["sparsity"] == "2:4" and manifest["layout"] == "compressed" and manifest["dtype"] == "float32"
    qc = json.loads((compressed_dir / "config.json").read_text())["quantization_config"]
    assert qc == {"quant_method": "compressed-tensors", "sparsity_config": {
        "format": "sparse-24-bitmask", "sparsity_structure": "2:4", "targets": ["Linear"], "ignore": ["lm_head"]}}
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (compressed_dir / name).read_bytes() == (pruned_dir / name).read_bytes()


def test_dense_to_compressed_to_dense_is_bit_exact(compressed_dir, pruned_dir, pruned_state, tmp_path):
    state = read_state_dict(compressed_dir)
    assert set(state) == set(pruned_state)
    assert all(same_bits(state[k], pruned_state[k]) for k in state)
    # our dense export, re-compressed and exported dense again, gives byte-identical shards
    opts = ExportOptions(format="dense", shard_size="100KB")
    convert_checkpoint(pruned_dir, tmp_path / "d1", opts)
    convert_checkpoint(tmp_path / "d1", tmp_path / "c", ExportOptions(shard_size="100KB"))
    convert_checkpoint(tmp_path / "c", tmp_path / "d2", opts)
    first = sorted(p.name for p in (tmp_path / "d1").glob("*.safetensors"))
    assert first == sorted(p.name for p in (tmp_path / "d2").glob("*.safetensors")) and len(first) > 1
    assert all((tmp_path / "d1" / f).read_bytes() == (tmp_path / "d2" / f).read_bytes() for f in first)
    assert "quantization_config" not in json.loads((tmp_path / "d2" / "config.json").read_text())


def test_loaded_model_gives_the_dense_models_logits(compressed_dir, pruned_dir, caplog):
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(pruned_dir, dtype=torch.float32).eval()
    with caplog.at_level("INFO", logger="compressor"):
        model = load_compressed_model(compressed_dir)
    notices = [r.getMessage() for r in caplog.records if "stay dense" in r.getMessage()]
    assert notices == [
        "2:4 sparse kernels need a CUDA GPU with compute capability >= 8.0: 14 sparse linears stay dense"
    ]
    ids = torch.randint(0, reference.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_linears_shrink_to_0_5625(pruned_dir, pruned_state, tmp_path, dtype):
    summary = convert_checkpoint(pruned_dir, tmp_path / "c", ExportOptions(dtype=dtype))
    assert summary.sparse_layers == 14 and summary.sparse_density == 0.5
    shape_tensors = 16 * summary.sparse_layers
    assert (summary.linear_stored_bytes - shape_tensors) / summary.linear_dense_bytes == 0.5625
    state = read_state_dict(tmp_path / "c")
    target = getattr(torch, dtype)
    assert all(same_bits(state[k], v.to(target)) for k, v in pruned_state.items())
    assert json.loads((tmp_path / "c" / "config.json").read_text())["dtype"] == dtype


def test_run_folder_masks_and_logits_are_applied(tiny_llama_dir, dense_state, pruned_state, tmp_path):
    masks = magnitude_masks(dense_state, NM(2, 4))
    run = tmp_path / "run"
    shutil.copytree(tiny_llama_dir, run / "model")  # the unpruned weights: the masks must be applied
    save_masks(run / "masks.safetensors", masks, "2:4")
    convert_checkpoint(run, tmp_path / "from-masks")
    state = read_state_dict(tmp_path / "from-masks")
    assert all(same_bits(state[k], pruned_state[k]) for k in pruned_state)
    # learned logits: the pattern with the highest logit wins; build logits whose argmax is the mask
    patterns = nm_patterns(NM(2, 4)).float()  # (6, 4)
    logits = {}
    for name, mask in masks.items():
        groups = mask.reshape(mask.shape[0], -1, 4).float()  # (out, G, 4)
        logits[name] = groups @ patterns.T + 0.1 * torch.rand(*groups.shape[:2], 6)  # match=2 beats <=1
    (run / "masks.safetensors").unlink()
    save_logits(run / "logits.safetensors", logits, "2:4")
    convert_checkpoint(run, tmp_path / "from-logits")
    state = read_state_dict(tmp_path / "from-logits")
    assert all(same_bits(state[k], pruned_state[k]) for k in pruned_state)
    save_masks(tmp_path / "m.safetensors", masks, "2:4")
    with pytest.raises(ConfigError, match="not both"):
        convert_checkpoint(run, tmp_path / "x", masks=tmp_path / "m.safetensors", logits=run / "logits.safetensors")
    shutil.rmtree(run / "model")
    with pytest.raises(CheckpointError, match="has no model/"):
        convert_checkpoint(run, tmp_path / "x")


def test_general_nm_is_stored_without_compressed_tensors_metadata(tiny_llama_dir, dense_state, tmp_path):
    nm = NM(1, 4)
    masks = magnitude_masks(dense_state, nm)
    folder = tmp_path / "model"
    shutil.copytree(tiny_llama_dir, folder)
    save_masks(tmp_path / "m.safetensors", masks, str(nm))
    convert_checkpoint(folder, tmp_path / "c", masks=tmp_path / "m.safetensors")
    with safe_open(str(next((tmp_path / "c").glob("*.safetensors"))), framework="pt") as fh:
        key = next(k for k in fh.keys() if k.endswith("q_proj.compressed"))
        assert fh.get_tensor(key).shape == (64, 64 // 4)
    assert "quantization_config" not in json.loads((tmp_path / "c" / "config.json").read_text())
    state = read_state_dict(tmp_path / "c")
    assert all(same_bits(state[k], v * masks[k] if k in masks else v) for k, v in dense_state.items())


def test_layer_selection_and_pattern_validation(tiny_llama_dir, pruned_dir, tmp_path):
    with pytest.raises(SparsityPatternError, match=r"model\.layers\.0\.\S+\.weight: .*break the 2:4.*--ignore"):
        convert_checkpoint(tiny_llama_dir, tmp_path / "dense-input")  # not pruned: every tensor is validated
    assert not (tmp_path / "dense-input").exists()
    summary = convert_checkpoint(pruned_dir, tmp_path / "c", ExportOptions(ignore=(r".*\.mlp\..*",)))
    assert summary.sparse_layers == 8  # q, k, v, o of 2 blocks
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert all("self_attn" in n for n in manifest["sparse_layers"])
    config = json.loads((tmp_path / "c" / "config.json").read_text())
    targets = config["quantization_config"]["sparsity_config"]["targets"]
    assert targets == [n[: -len(".weight")] for n in manifest["sparse_layers"]]
    index = json.loads((tmp_path / "c" / "model.safetensors.index.json").read_text())["weight_map"]
    assert "model.layers.1.mlp.up_proj.weight" in index and "model.layers.1.mlp.up_proj.bitmask" not in index
    with pytest.raises(ConfigError, match="regular expression"):
        validate_config(ExportOptions, {"targets": ["("]})


def test_cli_help_and_conversion(pruned_dir, tmp_path, capsys):
    done = subprocess.run([sys.executable, "tools/convert_checkpoint.py", "--help"], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0 and "--shard-size" in done.stdout and "--logits" in done.stdout
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import convert_checkpoint as tool
    finally:
        sys.path.remove(str(ROOT / "tools"))
    code = tool.main([str(pruned_dir), str(tmp_path / "c"), "--dtype", "bfloat16", "--json", str(tmp_path / "s.json")])
    out = capsys.readouterr().out
    assert code == 0 and "sparse layers : 14" in out and re.search(r"sparse linears: .*\(0\.56\d\dx\)", out)
    assert json.loads((tmp_path / "s.json").read_text())["dtype"] == "bfloat16"
    assert tool.main([str(pruned_dir), str(tmp_path / "c")]) == 2  # exists, no --overwrite
    assert "already exists" in capsys.readouterr().err
