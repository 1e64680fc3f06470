"""Weights on demand: read tensors by name from a folder's safetensors files into meta modules.

This is how a model larger than memory is walked: build it on the meta device, then
``materialize`` one decoder block, work on it, and ``release`` it again.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from compressor.errors import CheckpointError
from compressor.utils.fs import read_json

INDEX_NAME = "model.safetensors.index.json"


def read_weight_map(index: Path) -> dict[str, str]:
    """Tensor name -> shard file of a transformers ``model.safetensors.index.json``, checked."""
    weight_map = read_json(index, CheckpointError).get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{index} has no weight_map of tensor names to shard files; it is damaged")
    return weight_map


class WeightStore:
    """Name -> tensor access over ``model.safetensors`` or a sharded ``model.safetensors.index.json``.

    safetensors memory-maps the files it reads, and every page a read touched counts in the process's
    RSS for as long as the file stays open: a walk over a model larger than memory calls ``close`` after
    each block, or its RSS grows to the size of the files read.
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        index = self.folder / INDEX_NAME
        single = self.folder / "model.safetensors"
        if index.is_file():
            self._files = {name: self.folder / file for name, file in read_weight_map(index).items()}
        elif single.is_file():
            from safetensors import safe_open

            with safe_open(single, framework="pt") as fh:
                self._files = {name: single for name in fh.keys()}
        else:
            raise CheckpointError(f"{self.folder} has no model.safetensors or model.safetensors.index.json")
        self._handles: dict[Path, object] = {}

    def __contains__(self, name: str) -> bool:
        return name in self._files

    @property
    def names(self) -> list[str]:
        return list(self._files)

    def _handle(self, name: str):
        if name not in self._files:
            raise CheckpointError(f"tensor {name!r} is not in the checkpoint at {self.folder}")
        path = self._files[name]
        if path not in self._handles:
            from safetensors import safe_open

            self._handles[path] = safe_open(path, framework="pt")
        return self._handles[path]

    def get(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        tensor = self._handle(name).get_tensor(name)
        return tensor.to(dtype) if dtype is not None else tensor

    def shape(self, name: str) -> tuple[int, ...]:
        """A tensor's shape, from the file's header (no data read)."""
        return tuple(self._handle(name).get_slice(name).get_shape())

    def close(self) -> None:
        """Unmap the open files (the next ``get`` opens them again)."""
        self._handles.clear()


def _set_tensor(module: nn.Module, name: str, value: torch.Tensor) -> None:
    owner_path, _, leaf = name.rpartition(".")
    owner = module.get_submodule(owner_path) if owner_path else module
    if leaf in owner._parameters:
        old = owner._parameters[leaf]
        owner._parameters[leaf] = nn.Parameter(value, requires_grad=old.requires_grad if old is not None else False)
    else:
        owner._buffers[leaf] = value


def materialize(module: nn.Module, prefix: str, store: WeightStore, dtype: torch.dtype, aliases: dict[str, str] | None = None) -> None:
    """Load every parameter and persistent buffer of ``module`` (named ``prefix`` in the model)."""
    aliases = aliases or {}
    names = [n for n, _ in module.named_parameters()] + [
        n for n, b in module.named_buffers() if n.rsplit(".", 1)[-1] not in _non_persistent(module, n)
    ]
    for name in names:
        full = f"{prefix}.{name}" if prefix else name
        full = aliases.get(full, full)
        _set_tensor(module, name, store.get(full, dtype))


def _non_persistent(module: nn.Module, buffer_name: str) -> set[str]:
    owner_path, _, _ = buffer_name.rpartition(".")
    owner = module.get_submodule(owner_path) if owner_path else module
    return owner._non_persistent_buffers_set


def release(module: nn.Module) -> None:
    """Drop a materialized module's storage (back to the meta device)."""
    module.to("meta")


def materialize_outer(model: nn.Module, arch, store: WeightStore, dtype: torch.dtype) -> None:
    """Load everything outside the decoder blocks: embeddings, final norm, LM head, rotary tables."""
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    embed_name = f"{arch.embed_tokens}.weight"
    for path in (arch.embed_tokens, arch.final_norm, arch.lm_head):
        aliases = {}
        if path == arch.lm_head and tied and f"{path}.weight" not in store:
            aliases = {f"{path}.weight": embed_name}
        materialize(model.get_submodule(path), path, store, dtype, aliases)
    if tied:
        model.tie_weights()
    rebuild_rotary(model, arch)


def rebuild_rotary(model: nn.Module, arch) -> None:
    """Rotary tables are non-persistent buffers computed at construction, so no checkpoint holds them:
    a model built on the meta device gets them recomputed on CPU."""
    if arch.rotary_emb:
        parent_path, _, leaf = arch.rotary_emb.rpartition(".")
        parent = model.get_submodule(parent_path)
        setattr(parent, leaf, type(getattr(parent, leaf))(config=model.config))
