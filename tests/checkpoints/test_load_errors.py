"""Broken checkpoints fail loudly, naming file and tensor; an interrupted export leaves nothing that looks complete."""

import hashlib
import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from compressor.checkpoints.convert import ExportOptions, open_source, write_sharded
from compressor.checkpoints.load import CheckpointReader, load_compressed_model, read_state_dict
from compressor.errors import CheckpointError, SparsityPatternError


@pytest.fixture
def copy(compressed_dir, tmp_path):
    out = tmp_path / "ckpt"
    shutil.copytree(compressed_dir, out)
    return out


def layer_shard(folder, suffix="model.layers.0.self_attn.q_proj.bitmask"):
    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    return folder / index[suffix]


def test_corrupt_shard_fails_its_checksum_naming_file_and_tensors(copy):
    shard = layer_shard(copy)
    data = bytearray(shard.read_bytes())
    data[-10] ^= 0xFF  # inside the tensor data: the file still parses
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=rf"{shard.name}.*model\.layers\.0\..*SHA-256"):
        read_state_dict(copy)
    with pytest.raises(CheckpointError, match="SHA-256"):
        load_compressed_model(copy)


def test_truncated_and_missing_shards(copy):
    shard = layer_shard(copy)
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=rf"{shard.name}.*truncated"):
        read_state_dict(copy)
    with pytest.raises(CheckpointError, match=rf"{shard.name}"):  # without checksums, the reader still names it
        read_state_dict(copy, verify=False)
    shard.unlink()
    with pytest.raises(CheckpointError, match=rf"{shard.name}.* is missing"):
        read_state_dict(copy)


def test_wrong_pattern_names_file_and_tensor(copy):
    shard = layer_shard(copy, "model.layers.1.mlp.up_proj.bitmask")
    with safe_open(str(shard), framework="pt") as fh:
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    tensors["model.layers.1.mlp.up_proj.bitmask"][3, 2] = 0xFF  # two groups keep 4 of 4
    save_file(tensors, str(shard), metadata={"format": "pt"})
    manifest = json.loads((copy / "manifest.json").read_text())
    for entry in manifest["shards"]:  # a consistent manifest: only the pattern check can catch it
        if entry["file"] == shard.name:
            entry["sha256"] = hashlib.sha256(shard.read_bytes()).hexdigest()
            entry["bytes"] = shard.stat().st_size
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(SparsityPatternError, match=rf"{shard.name}: tensor model\.layers\.1\.mlp\.up_proj\.bitmask"
                                                   r".*row 3, group 4 keeps 4"):
        read_state_dict(copy)


def test_without_a_manifest_every_tensor_is_verified(copy, pruned_state):
    (copy / "manifest.json").unlink()
    assert CheckpointReader(copy).verification == "full"
    state = read_state_dict(copy)
    assert len(state) == 21 and all(torch.equal(state[k], pruned_state[k].masked_fill(pruned_state[k] == 0, 0))
                                    for k in state)
    assert CheckpointReader(copy, verify=False).verification == "none"


class Exploding:
    """A source that fails while one shard job reads its tensors."""

    def __init__(self, inner, bad: str) -> None:
        self.inner, self.bad = inner, bad

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def get(self, name: str) -> torch.Tensor:
        if name == self.bad:
            raise RuntimeError(f"simulated crash reading {name}")
        return self.inner.get(name)


def test_interrupted_export_leaves_no_complete_looking_output(pruned_dir, compressed_dir, tmp_path):
    source = Exploding(open_source(pruned_dir), "model.layers.1.mlp.up_proj.weight")
    opts = ExportOptions(shard_size="100KB")
    with pytest.raises(RuntimeError, match="simulated crash"):
        write_sharded(source, tmp_path / "out", opts)
    assert list(tmp_path.iterdir()) == []  # neither the folder nor a temporary one
    # replacing a finished export: the failure leaves the old one intact and valid
    shutil.copytree(compressed_dir, tmp_path / "out")
    before = sorted((p.name, p.read_bytes()) for p in (tmp_path / "out").iterdir())
    with pytest.raises(RuntimeError, match="simulated crash"):
        write_sharded(source, tmp_path / "out", opts.model_copy(update={"overwrite": True}))
    assert sorted((p.name, p.read_bytes()) for p in (tmp_path / "out").iterdir()) == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    CheckpointReader(tmp_path / "out").verify()


def test_index_naming_an_unlisted_shard_is_refused(copy):
    index_path = copy / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["model.norm.weight"] = "model-99999-of-99999.safetensors"
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="model-99999-of-99999.safetensors.*missing from the manifest"):
        read_state_dict(copy)
