"""Read a compressed (or dense) sharded checkpoint back: verify, decompress, build a transformers model.

Every check names the file and tensor at fault: a missing manifest (unfinished export), a shard that
is missing, truncated or fails its SHA-256, an unreadable tensor, a bitmask that breaks the N:M pattern.
On CUDA with compute capability >= 8.0 the 2:4 linears can use PyTorch's semi-structured sparse kernels.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import torch

from compressor.checkpoints.compressed import SUFFIXES, compressed_keys, decompress_nm
from compressor.checkpoints.sharded import DTYPES, INDEX_NAME, read_manifest, sha256_file
from compressor.errors import CheckpointError
from compressor.execution.base import Executor, InProcessExecutor
from compressor.sparsity.nm import NM
from compressor.utils.logging import get_logger

log = get_logger(__name__)


def checkpoint_sparsity(folder: Path, manifest: Optional[dict]) -> Optional[NM]:
    """The N:M of a checkpoint: from our manifest, else from a compressed-tensors ``sparsity_config``."""
    if manifest and manifest.get("sparsity"):
        return NM.parse(manifest["sparsity"])
    config = folder / "config.json"
    if config.is_file():
        sparsity = (json.loads(config.read_text()).get("quantization_config") or {}).get("sparsity_config") or {}
        if sparsity.get("sparsity_structure") not in (None, "unstructured", "0:0"):
            return NM.parse(sparsity["sparsity_structure"])
    return None


class CheckpointReader:
    """Dense tensors by name from a sharded checkpoint folder, decompressing N:M layers on the fly.

    Picklable (open file handles are not carried), so it can be the source of an export job.
    """

    def __init__(self, folder: str | Path, verify: bool = True) -> None:
        self.folder = Path(folder)
        self.manifest = read_manifest(self.folder) if verify else _try_manifest(self.folder)
        index = self.folder / INDEX_NAME
        if index.is_file():
            self.stored = json.loads(index.read_text())["weight_map"]  # stored key -> file
        elif (self.folder / "model.safetensors").is_file():
            self.stored = {k: "model.safetensors" for k in _keys(self.folder / "model.safetensors")}
        else:
            raise CheckpointError(f"{self.folder} has no {INDEX_NAME} and no model.safetensors")
        self.nm = checkpoint_sparsity(self.folder, self.manifest)
        prefixes = {k[: -len(".bitmask")] for k in self.stored if k.endswith(".bitmask")}
        for prefix in sorted(prefixes):
            missing = [s for s in SUFFIXES if f"{prefix}.{s}" not in self.stored]
            if missing:
                raise CheckpointError(f"{self.folder}: compressed layer {prefix} lacks {', '.join(missing)}")
        if prefixes and self.nm is None:
            raise CheckpointError(
                f"{self.folder}: compressed layers but no N:M sparsity in manifest.json or config.json"
            )
        self.compressed = {f"{p}.weight" for p in prefixes}
        parts = {f"{p}.{s}" for p in prefixes for s in SUFFIXES}
        self.names = sorted(self.compressed | {k for k in self.stored if k not in parts})
        self._handles: dict[str, Any] = {}
        if verify:
            self._check_manifest_files()

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_handles": {}}

    # --- verification -------------------------------------------------------------------------
    def _check_manifest_files(self) -> None:
        listed = {s["file"] for s in self.manifest["shards"]}
        unlisted = sorted(set(self.stored.values()) - listed)
        if unlisted:
            raise CheckpointError(f"{self.folder}: {INDEX_NAME} names shard(s) {unlisted} missing from the manifest")

    def tensors_in(self, file: str) -> list[str]:
        return sorted(k for k, f in self.stored.items() if f == file)

    def verify_shard(self, file: str) -> None:
        """Size and SHA-256 of one shard against the manifest."""
        entry = next((s for s in self.manifest["shards"] if s["file"] == file), None) if self.manifest else None
        if entry is None:
            raise CheckpointError(f"{self.folder}: shard {file} is not in the manifest")
        path = self.folder / file
        held = self.tensors_in(file)
        what = f"shard {path} (holds {len(held)} tensors: {', '.join(held[:3])}{', ...' if len(held) > 3 else ''})"
        if not path.is_file():
            raise CheckpointError(f"{what} is missing; re-run the export")
        size = path.stat().st_size
        if size != entry["bytes"]:
            raise CheckpointError(f"{what} is {size} bytes, the manifest says {entry['bytes']}: truncated or replaced")
        if sha256_file(path) != entry["sha256"]:
            raise CheckpointError(f"{what} fails its SHA-256 checksum: the file is corrupt; re-run the export")

    def verify(self) -> None:
        for shard in self.manifest["shards"]:
            self.verify_shard(shard["file"])

    # --- reading ------------------------------------------------------------------------------
    def _handle(self, file: str) -> Any:
        if file not in self._handles:
            from safetensors import safe_open

            try:
                self._handles[file] = safe_open(str(self.folder / file), framework="pt")
            except Exception as exc:  # safetensors raises several types for truncated / corrupt files
                raise CheckpointError(f"cannot read shard {self.folder / file}: {exc}") from exc
        return self._handles[file]

    def _raw(self, key: str) -> torch.Tensor:
        file = self.stored[key]
        handle = self._handle(file)
        try:
            return handle.get_tensor(key)
        except Exception as exc:
            raise CheckpointError(f"{self.folder / file}: cannot read tensor {key} ({exc})") from exc

    def _meta(self, key: str) -> tuple[tuple[int, ...], torch.dtype]:
        view = self._handle(self.stored[key]).get_slice(key)
        return tuple(view.get_shape()), _SAFETENSORS_DTYPES[view.get_dtype()]

    def is_compressed(self, name: str) -> bool:
        return name in self.compressed

    def info(self, name: str) -> tuple[tuple[int, ...], torch.dtype]:
        """Dense shape and dtype of ``name`` without decompressing it."""
        if name in self.compressed:
            keys = compressed_keys(name)
            shape = tuple(int(v) for v in self._raw(keys["shape"]).flatten().tolist())
            return shape, self._meta(keys["compressed"])[1]
        if name not in self.stored:
            raise CheckpointError(f"tensor {name!r} is not in the checkpoint at {self.folder}")
        return self._meta(name)

    def get(self, name: str) -> torch.Tensor:
        if name in self.compressed:
            keys = compressed_keys(name)
            parts = {suffix: self._raw(key) for suffix, key in keys.items()}
            where = f"{self.folder / self.stored[keys['bitmask']]}: tensor {keys['bitmask']}"
            return decompress_nm(parts, self.nm, where)
        if name not in self.stored:
            raise CheckpointError(f"tensor {name!r} is not in the checkpoint at {self.folder}")
        return self._raw(name)


_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64,
    "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}


def _try_manifest(folder: Path) -> Optional[dict]:
    try:
        return read_manifest(folder)
    except CheckpointError:
        return None


def _keys(path: Path) -> list[str]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            return list(fh.keys())
    except Exception as exc:
        raise CheckpointError(f"cannot read {path}: {exc}") from exc


def _read_shard_job(reader: CheckpointReader, file: str, names: list[str], verify: bool) -> dict[str, torch.Tensor]:
    if verify:
        reader.verify_shard(file)
    return {name: reader.get(name) for name in names}


def read_state_dict(
    folder: str | Path, verify: bool = True, executor: Optional[Executor] = None
) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint, dense, checked and decompressed by one job per shard."""
    reader = CheckpointReader(folder, verify=verify)
    by_file: dict[str, list[str]] = {}
    for name in reader.names:
        key = compressed_keys(name)["bitmask"] if reader.is_compressed(name) else name
        by_file.setdefault(reader.stored[key], []).append(name)
    for shard in (reader.manifest or {}).get("shards", []) if verify else []:
        by_file.setdefault(shard["file"], [])  # every shard is checked, even one that holds no whole tensor
    executor = executor or InProcessExecutor()
    handle = executor.put(reader)
    jobs = [executor.submit(_read_shard_job, handle, file, names, verify) for file, names in sorted(by_file.items())]
    state: dict[str, torch.Tensor] = {}
    for part in executor.gather(jobs, desc="read shards"):
        state.update(part)
    return state


def load_compressed_model(
    folder: str | Path,
    dtype: Optional[str] = None,
    device: str | torch.device = "cpu",
    verify: bool = True,
    executor: Optional[Executor] = None,
    semi_structured: bool = True,
) -> Any:
    """A transformers causal LM with the checkpoint's (decompressed) weights, in eval mode.

    ``dtype`` defaults to the checkpoint's. On CUDA (capability >= 8.0) with ``semi_structured`` the 2:4
    linears get semi-structured sparse weights; elsewhere they stay dense, with a one-line notice.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    from compressor.models.arch import get_arch
    from compressor.models.lazy import rebuild_rotary

    folder = Path(folder)
    state = read_state_dict(folder, verify=verify, executor=executor)
    reader = CheckpointReader(folder, verify=False)
    config = AutoConfig.from_pretrained(folder)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # our loader decompresses; transformers must not quantize again
    name = dtype or (reader.manifest or {}).get("dtype") or "float32"
    if name not in DTYPES:
        raise CheckpointError(f"unknown dtype {name!r}; use one of {sorted(DTYPES)}")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=DTYPES[name])
    state = {k: (v.to(DTYPES[name]) if v.is_floating_point() else v) for k, v in state.items()}
    result = model.load_state_dict(state, strict=False, assign=True)
    if result.unexpected_keys:
        raise CheckpointError(f"{folder}: tensors the model does not have: {result.unexpected_keys[:5]}")
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    rebuild_rotary(model, get_arch(config))
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise CheckpointError(f"{folder}: the checkpoint lacks {len(left)} tensor(s) of the model, e.g. {left[:3]}")
    model.to(device).eval()
    if semi_structured and reader.compressed:
        use_semi_structured(model, sorted(n[: -len(".weight")] for n in reader.compressed), reader.nm)
    return model


def use_semi_structured(model: Any, layers: list[str], nm: Optional[NM]) -> int:
    """Swap the given linears' weights for 2:4 semi-structured sparse tensors where the GPU supports it."""
    device = next(model.parameters()).device
    ok = device.type == "cuda" and nm == NM(2, 4) and torch.cuda.get_device_capability(device) >= (8, 0)
    if not ok:
        log.info("2:4 sparse kernels need a CUDA GPU with compute capability >= 8.0: %d sparse linears stay dense",
                 len(layers))
        return 0
    from torch.sparse import to_sparse_semi_structured

    swapped = 0
    try:
        for name in layers:
            linear = model.get_submodule(name)
            linear.weight = torch.nn.Parameter(to_sparse_semi_structured(linear.weight.detach()), requires_grad=False)
            swapped += 1
    except (RuntimeError, TypeError, ValueError) as exc:  # unsupported dtype or shape: keep the rest dense
        log.warning("semi-structured sparse weights not used after %d layers (%s); the rest stay dense", swapped, exc)
    return swapped

