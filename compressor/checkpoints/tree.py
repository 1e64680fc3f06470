"""Nested state (optimizer state, RNG states, data positions, history) as safetensors plus JSON.

Neither file can hold code: tensors go into ``<name>.safetensors``; everything else (dicts, lists,
tuples, str, int, float, bool, None) into ``<name>.json``, where a tagged object stands for what JSON
cannot say itself (a tensor reference, a tuple, a dict with non-string keys, a non-finite float).
Reading rebuilds exactly these types and refuses anything else, so a crafted checkpoint can at worst
hold wrong numbers, never run a program. The JSON file is written last: it marks a complete tree.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from compressor.errors import CheckpointError
from compressor.utils.fs import atomic_save_safetensors, atomic_write_text, read_json

FORMAT = "compressor.tree.v1"
TAG = "__tree__"


def _encode(value: Any, tensors: dict[str, torch.Tensor], where: str) -> Any:
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {TAG: "float", "value": repr(value)}
    if isinstance(value, torch.Tensor):
        key = f"t{len(tensors)}"
        # a fresh copy: safetensors refuses views that share storage
        tensors[key] = value.detach().cpu().contiguous().clone()
        return {TAG: "tensor", "key": key}
    if isinstance(value, tuple):
        return {TAG: "tuple", "items": [_encode(v, tensors, f"{where}[{i}]") for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_encode(v, tensors, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict):
        if all(isinstance(k, str) for k in value) and TAG not in value:
            return {k: _encode(v, tensors, f"{where}.{k}") for k, v in value.items()}
        return {TAG: "dict", "items": [[_encode(k, tensors, f"{where} key"), _encode(v, tensors, f"{where}[{k!r}]")]
                                       for k, v in value.items()]}
    raise TypeError(f"{where}: a {type(value).__name__} cannot be stored in a checkpoint (tensors, numbers, "
                    "strings, None and lists / tuples / dicts of them only)")


def _decode(node: Any, tensors: dict[str, torch.Tensor], where: str) -> Any:
    if node is None or isinstance(node, (bool, str, int, float)):
        return node
    if isinstance(node, list):
        return [_decode(v, tensors, where) for v in node]
    if not isinstance(node, dict):
        raise CheckpointError(f"{where}: unexpected JSON value {node!r}")
    tag = node.get(TAG)
    if tag is None:
        return {k: _decode(v, tensors, where) for k, v in node.items()}
    if tag == "tensor":
        if node.get("key") not in tensors:
            raise CheckpointError(f"{where}: refers to tensor {node.get('key')!r}, which its .safetensors file lacks")
        return tensors[node["key"]]
    if tag == "tuple":
        return tuple(_decode(v, tensors, where) for v in node["items"])
    if tag == "dict":
        return {_decode(k, tensors, where): _decode(v, tensors, where) for k, v in node["items"]}
    if tag == "float" and node.get("value") in ("inf", "-inf", "nan"):
        return float(node["value"])
    raise CheckpointError(f"{where}: unknown entry {node!r}; the file was not written by compressor")


def save_tree(path: str | Path, tree: Any) -> None:
    """Write ``tree`` as ``path.safetensors`` and ``path.json`` (atomically, the JSON last)."""
    path = Path(path)
    tensors: dict[str, torch.Tensor] = {}
    body = _encode(tree, tensors, path.name)
    atomic_save_safetensors(tensors, path.with_name(path.name + ".safetensors"), metadata={"format": FORMAT})
    atomic_write_text(path.with_name(path.name + ".json"), json.dumps({"format": FORMAT, "tree": body}) + "\n")


def tree_exists(path: str | Path) -> bool:
    return Path(str(path) + ".json").is_file()


def load_tree(path: str | Path) -> Any:
    """The tree ``save_tree`` wrote; a missing, truncated or foreign file is a CheckpointError naming it."""
    from safetensors.torch import load_file

    path = Path(path)
    doc_path, tensor_path = path.with_name(path.name + ".json"), path.with_name(path.name + ".safetensors")
    doc = read_json(doc_path, CheckpointError)
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise CheckpointError(f"{doc_path} is not a compressor checkpoint file (format {FORMAT!r} expected)")
    if not tensor_path.is_file():
        raise CheckpointError(f"{tensor_path} is missing: the checkpoint is incomplete")
    try:
        tensors = load_file(str(tensor_path))
    except Exception as exc:  # safetensors raises several types for truncated / corrupt files
        raise CheckpointError(f"cannot read {tensor_path}: {exc}") from exc
    return _decode(doc["tree"], tensors, str(doc_path))
