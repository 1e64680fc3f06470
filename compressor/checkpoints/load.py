"""Read a compressed (or dense) sharded checkpoint back: verify, decompress, build a transformers model.

Verification cannot be skipped by accident. A folder with our manifest is checked against it (size
and SHA-256 of every shard); a folder without a valid one (any HF folder, a run's ``model/``, an
export made with ``--trust-unverified``) is verified in full as its tensors are read: every name and
shape against the model of its config, every value finite, the N:M pattern of every bitmask (an
export re-checks the pattern of whatever it writes as sparse). ``verify=False`` (the CLI's ``--trust-unverified``) is the explicit way
out. Every check names the file and tensor at fault. On CUDA with compute capability >= 8.0 the 2:4
linears can use PyTorch's semi-structured sparse kernels.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch

from compressor.checkpoints.compressed import SUFFIXES, compressed_keys, decompress_nm
from compressor.checkpoints.streaming import SAFETENSORS_DTYPES
from compressor.checkpoints.sharded import DTYPES, INDEX_NAME, MANIFEST_NAME, read_manifest, sha256_file
from compressor.errors import CheckpointError
from compressor.execution.base import Executor, InProcessExecutor
from compressor.models.checks import all_finite
from compressor.models.lazy import read_weight_map
from compressor.sparsity.nm import NM
from compressor.sparsity.plan import parse_level
from compressor.utils.fs import read_json
from compressor.utils.logging import get_logger

log = get_logger(__name__)


def checkpoint_sparsity(folder: Path, manifest: Optional[dict]) -> Optional[NM]:
    """The N:M of a checkpoint: from our manifest, else from a compressed-tensors ``sparsity_config``;
    None for a mixed export (its manifest's ``levels`` give each layer's)."""
    if manifest and manifest.get("sparsity"):
        return None if manifest["sparsity"] == "mixed" else NM.parse(manifest["sparsity"])
    config = folder / "config.json"
    if config.is_file():
        sparsity = (read_json(config, CheckpointError).get("quantization_config") or {}).get("sparsity_config") or {}
        if sparsity.get("sparsity_structure") not in (None, "unstructured", "0:0"):
            return NM.parse(sparsity["sparsity_structure"])
    return None


class CheckpointReader:
    """Dense tensors by name from a sharded checkpoint folder, decompressing N:M layers on the fly.

    ``verification`` says how what it returns was checked: "sha256" (our manifest), "full" (no
    valid manifest: every tensor checked as it is read, see the module docstring) or "none"
    (``verify=False``). Picklable (open file handles are not carried), so it can be the source of
    an export job.
    """

    def __init__(self, folder: str | Path, verify: bool = True) -> None:
        self.folder = Path(folder)
        self.manifest = _try_manifest(self.folder)
        self.verification = ("sha256" if self.manifest else "full") if verify else "none"
        index = self.folder / INDEX_NAME
        if index.is_file():
            self.stored = read_weight_map(index)  # stored key -> file
        elif (self.folder / "model.safetensors").is_file():
            self.stored = {k: "model.safetensors" for k in _keys(self.folder / "model.safetensors")}
        else:
            raise CheckpointError(f"{self.folder} has no {INDEX_NAME} and no model.safetensors")
        self.nm = checkpoint_sparsity(self.folder, self.manifest)
        self.levels = _manifest_levels(self.folder, self.manifest)  # a mixed export's per-layer levels
        prefixes = {k[: -len(".bitmask")] for k in self.stored if k.endswith(".bitmask")}
        for prefix in sorted(prefixes):
            missing = [s for s in SUFFIXES if f"{prefix}.{s}" not in self.stored]
            if missing:
                raise CheckpointError(f"{self.folder}: compressed layer {prefix} lacks {', '.join(missing)}")
            if not isinstance(self._level(f"{prefix}.weight"), NM):
                raise CheckpointError(
                    f"{self.folder}: compressed layer {prefix} but no N:M sparsity for it in manifest.json or config.json"
                )
        self.compressed = {f"{p}.weight" for p in prefixes}
        parts = {f"{p}.{s}" for p in prefixes for s in SUFFIXES}
        self.names = sorted(self.compressed | {k for k in self.stored if k not in parts})
        self._handles: dict[str, Any] = {}
        self._expected: Optional[dict[str, tuple[int, ...]]] = None
        if self.verification == "sha256":
            self._check_manifest_files()
        elif self.verification == "full":
            self._expected = _expected_shapes(self.folder)
            self._check_names()

    def _level(self, name: str):
        """The level a weight was stored at: its own in a mixed export, else the checkpoint's N:M."""
        return self.levels.get(name) if self.levels is not None else self.nm

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

    def _check_names(self) -> None:
        """Full verification, part one: the tensors the config's model has, no more, no fewer."""
        unexpected = sorted(set(self.names) - set(self._expected))
        if unexpected:
            raise CheckpointError(f"{self.folder}: tensors the model of its config.json does not have: {unexpected[:3]}"
                                  " (a damaged index or another model's files)")
        tied = {"lm_head.weight"} if _tied(self.folder) else set()
        missing = sorted(set(self._expected) - set(self.names) - tied)
        if missing:
            raise CheckpointError(f"{self.folder}: {len(missing)} tensor(s) of the model are missing, e.g. {missing[:3]}")

    def _check_tensor(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """Full verification, part two, as each tensor is read: its shape and finite values."""
        if self._expected is None:
            return tensor
        where = f"{self.folder / self.stored.get(name, self.stored.get(compressed_keys(name)['bitmask'], '?'))}: {name}"
        if tuple(tensor.shape) != self._expected[name]:
            raise CheckpointError(f"{where} has shape {tuple(tensor.shape)}, the config's model {self._expected[name]}")
        if tensor.is_floating_point() and not all_finite(tensor):
            raise CheckpointError(f"{where} holds NaN or infinite values: the file is corrupt (this folder has no "
                                  "manifest to check it against); re-export it from its source")
        return tensor

    def verify_shard(self, file: str) -> None:
        """Size and SHA-256 of one shard against the manifest."""
        if self.verification != "sha256":
            return  # "full" checks each tensor as it is read
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
        """Check the whole folder now: every shard against the manifest, or every tensor in full."""
        if self.verification == "sha256":
            for shard in self.manifest["shards"]:
                self.verify_shard(shard["file"])
        elif self.verification == "full":
            for name in self.names:
                self.get(name)

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
            return self._check_tensor(name, decompress_nm(parts, self._level(name), where))
        if name not in self.stored:
            raise CheckpointError(f"tensor {name!r} is not in the checkpoint at {self.folder}")
        return self._check_tensor(name, self._raw(name))


_SAFETENSORS_DTYPES = {name: dtype for dtype, name in SAFETENSORS_DTYPES.items()}  # a header's name -> torch


def _manifest_levels(folder: Path, manifest: Optional[dict]) -> Optional[dict[str, Any]]:
    if not manifest or "levels" not in manifest:
        return None
    try:
        return {name: parse_level(text) for name, text in manifest["levels"].items()}
    except (ValueError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"{folder / MANIFEST_NAME}: bad per-layer levels ({exc}); re-run the export") from exc


def _try_manifest(folder: Path) -> Optional[dict]:
    """Our manifest, or None where there is none or it does not parse (the folder is then verified in full)."""
    try:
        return read_manifest(folder)
    except CheckpointError as exc:
        if (folder / MANIFEST_NAME).is_file():
            log.warning("%s; every tensor is verified instead", exc)
        return None


def _tied(folder: Path) -> bool:
    config = read_json(folder / "config.json", CheckpointError)
    return bool(config.get("tie_word_embeddings", False))


def _expected_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor of the model that the folder's config.json describes."""
    from compressor.models.loading import meta_model

    return {k: tuple(v.shape) for k, v in meta_model(folder).state_dict().items()}


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
    from compressor.models.arch import get_arch
    from compressor.models.lazy import rebuild_rotary
    from compressor.models.loading import meta_model

    folder = Path(folder)
    state = read_state_dict(folder, verify=verify, executor=executor)
    reader = CheckpointReader(folder, verify=False)
    stored = (reader.manifest or {}).get("dtype") or read_json(folder / "config.json", CheckpointError).get("dtype")
    name = dtype or (stored if stored in DTYPES else "float32")
    if name not in DTYPES:
        raise CheckpointError(f"unknown dtype {name!r}; use one of {sorted(DTYPES)}")
    model = meta_model(folder, DTYPES[name])
    config = model.config
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
    if semi_structured and reader.compressed:  # a mixed export: its 2:4 layers only
        layers = sorted(n[: -len(".weight")] for n in reader.compressed if reader._level(n) == reader.nm or
                        reader._level(n) == NM(2, 4))
        use_semi_structured(model, layers, reader.nm or NM(2, 4))
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

