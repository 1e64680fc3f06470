import shutil
from pathlib import Path

import pytest
import torch

from compressor.sparsity import NM, nm_mask_from_scores

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def is_linear(name: str) -> bool:
    return name.endswith(".weight") and name.rsplit(".", 2)[-2] in LINEARS


def magnitude_masks(state: dict, nm: NM) -> dict:
    return {k: nm_mask_from_scores(v.abs(), nm) for k, v in state.items() if is_linear(k)}


@pytest.fixture(scope="session")
def dense_state(tiny_llama_dir) -> dict:
    from safetensors.torch import load_file

    return load_file(str(tiny_llama_dir / "model.safetensors"))


@pytest.fixture(scope="session")
def pruned_dir(tiny_llama_dir, dense_state, tmp_path_factory) -> Path:
    """The tiny LLaMA pruned 2:4 by magnitude, as an HF dense-with-zeros folder (W * mask: has -0.0)."""
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("pruned") / "model"
    shutil.copytree(tiny_llama_dir, folder)
    masks = magnitude_masks(dense_state, NM(2, 4))
    state = {k: v * masks[k] if k in masks else v for k, v in dense_state.items()}
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


@pytest.fixture(scope="session")
def pruned_state(pruned_dir) -> dict:
    from safetensors.torch import load_file

    return load_file(str(pruned_dir / "model.safetensors"))


@pytest.fixture(scope="session")
def compressed_dir(pruned_dir, tmp_path_factory) -> Path:
    """Compressed 2:4 export in float32, small shards so that there are several."""
    from compressor.checkpoints.convert import ExportOptions, convert_checkpoint

    out = tmp_path_factory.mktemp("export") / "compressed"
    convert_checkpoint(pruned_dir, out, ExportOptions(shard_size="100KB"))
    return out


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bit for bit, counting -0.0 and +0.0 as the same (pruned entries are stored as +0.0)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if not a.is_floating_point():
        return torch.equal(a, b)
    view = {4: torch.int32, 2: torch.int16, 8: torch.int64}[a.element_size()]
    return torch.equal((a + 0.0).view(view), (b + 0.0).view(view))
