"""Export of a run pruned with a mixed sparsity plan: 2:4 layers as sparse-24-bitmask, other N:M in the
same bitmask layout with the level in the manifest, unstructured dense with zeros; read back exactly."""

import json

import pytest
import torch
import yaml
from safetensors import safe_open

from compressor.checkpoints.convert import ExportOptions, convert_checkpoint, format_summary
from compressor.checkpoints.load import load_compressed_model
from compressor.checkpoints.masks import load_masks, mask_file_levels, save_masks
from compressor.config.base import validate_config
from compressor.models import load_model
from compressor.runs.prune import PruneConfig, run_prune
from compressor.sparsity import NM
from tests.checkpoints.conftest import same_bits

PLAN = {"default": "2:4", "layers": {r".*self_attn\..*_proj": "4:8", "model.layers.1.mlp.down_proj": 0.5}}


@pytest.fixture(scope="module")
def mixed_run(tmp_path_factory, tiny_llama_dir):
    """Magnitude pruning (no calibration data needed) with the plan above."""
    root = tmp_path_factory.mktemp("mixed")
    (root / "plan.yaml").write_text(yaml.safe_dump(PLAN))
    cfg = validate_config(PruneConfig, {
        "model": {"source": str(tiny_llama_dir)}, "method": "magnitude", "sparsity_plan": str(root / "plan.yaml"),
        "layer_error": False, "evaluation": {"enabled": False}, "executor": {"kind": "inprocess"}})
    run_prune(cfg, root / "run")
    return root / "run"


def _keys(folder):
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    return set(index["weight_map"])


def test_a_mixed_run_exports_compressed_and_reads_back_exactly(mixed_run, tmp_path):
    out = tmp_path / "compressed"
    summary = convert_checkpoint(mixed_run, out, ExportOptions())
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["sparsity"] == "mixed"
    assert manifest["levels"]["model.layers.0.self_attn.q_proj.weight"] == "4:8"
    assert manifest["levels"]["model.layers.0.mlp.up_proj.weight"] == "2:4"
    assert manifest["levels"]["model.layers.1.mlp.down_proj.weight"] == "0.5"
    keys = _keys(out)
    assert "model.layers.0.mlp.up_proj.bitmask" in keys and "model.layers.0.self_attn.q_proj.compressed" in keys
    assert "model.layers.1.mlp.down_proj.weight" in keys and "model.layers.1.mlp.down_proj.bitmask" not in keys
    with safe_open(str(out / "model-00001-of-00001.safetensors"), framework="pt") as fh:
        assert tuple(fh.get_slice("model.layers.0.self_attn.q_proj.compressed").get_shape()) == (64, 32)
    # 4:8 layers are not compressed-tensors' 2:4: no sparse-24 config claims them
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    text = format_summary(summary)
    assert "sparse-24-bitmask: 5 layer(s)" in text and "4:8 bitmask (compressor layout): 8 layer(s)" in text
    assert "dense with zeros (unstructured 0.5): 1 layer(s), e.g. model.layers.1.mlp.down_proj.weight" in text

    pruned = load_model(str(mixed_run / "model")).model.state_dict()
    loaded = load_compressed_model(out).state_dict()
    for name, tensor in pruned.items():
        assert same_bits(loaded[name], tensor), name

    # and on to dense with zeros, with the levels still recorded and checked
    dense = tmp_path / "dense"
    convert_checkpoint(out, dense, ExportOptions(format="dense"))
    assert json.loads((dense / "manifest.json").read_text())["levels"] == manifest["levels"]
    assert not any(k.endswith(".bitmask") for k in _keys(dense))
    for name, tensor in load_compressed_model(dense).state_dict().items():
        assert same_bits(tensor, pruned[name]), name


def test_a_mixed_run_exports_dense_with_zeros(mixed_run, tmp_path):
    out = tmp_path / "dense"
    summary = convert_checkpoint(mixed_run, out, ExportOptions(format="dense"))
    assert summary.sparsity == "mixed" and not any(k.endswith(".bitmask") for k in _keys(out))
    pruned = load_model(str(mixed_run / "model")).model.state_dict()
    for name, tensor in load_compressed_model(out).state_dict().items():
        assert same_bits(tensor, pruned[name]), name


def test_a_mixed_compressed_export_needs_its_manifest(mixed_run, tmp_path):
    from compressor.errors import ConfigError

    with pytest.raises(ConfigError, match="drop --trust-unverified, or export with --to dense"):
        convert_checkpoint(mixed_run, tmp_path / "c", ExportOptions(trust_unverified=True))
    convert_checkpoint(mixed_run, tmp_path / "d", ExportOptions(trust_unverified=True, format="dense"))


def test_a_layer_off_its_level_is_refused(mixed_run, tmp_path):
    """Masks metadata that claims 2:4 for a layer whose mask is 4:8 fails the export, naming the layer."""
    from compressor.errors import SparsityPatternError

    masks = load_masks(mixed_run / "masks.safetensors")
    levels = {n: str(lv) if isinstance(lv, NM) else "0.5" for n, lv in mask_file_levels(mixed_run / "masks.safetensors").items()}
    levels["model.layers.0.self_attn.q_proj.weight"] = "2:4"
    save_masks(tmp_path / "masks.safetensors", masks, None, levels)
    with pytest.raises(SparsityPatternError, match=r"model\.layers\.0\.self_attn\.q_proj\.weight"):
        convert_checkpoint(mixed_run, tmp_path / "c", ExportOptions(), masks=tmp_path / "masks.safetensors")


def test_old_uniform_mask_files_still_load(tmp_path):
    mask = torch.tensor([[True, False, True, False]])
    save_masks(tmp_path / "m.safetensors", {"w.weight": mask}, "2:4")
    assert mask_file_levels(tmp_path / "m.safetensors") is None
    assert torch.equal(load_masks(tmp_path / "m.safetensors")["w.weight"], mask)


def test_the_export_command_says_how_each_layer_was_written(mixed_run, tmp_path, capsys):
    from compressor.cli import main

    assert main(["export", str(mixed_run), str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert "4:8 bitmask (compressor layout): 8 layer(s)" in printed and "unstructured 0.5" in printed
    assert "compressed-tensors reads only all-2:4 exports" in printed
