"""Sharded safetensors checkpoints: shard planning, one parallel job per shard, index and manifest.

A checkpoint folder holds ``model-0000i-of-0000n.safetensors`` shards, ``model.safetensors.index.json``
(the transformers index: tensor -> shard), ``config.json``, the tokenizer and generation config, and
``manifest.json`` with the SHA-256 of every shard. The folder is built under a hidden temporary name
and renamed when done; each shard is written atomically by its job, and the manifest is written last,
so a folder without a manifest is an unfinished export (see ``compressor.checkpoints.load``).
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Protocol, Sequence

import torch

from compressor.checkpoints.compressed import compress_nm, compressed_keys, compressed_nbytes
from compressor.errors import CheckpointError, ConfigError, SparsityPatternError
from compressor.execution.base import Executor, InProcessExecutor
from compressor.models.lazy import INDEX_NAME
from compressor.precision import DTYPES
from compressor.sparsity.nm import NM, assert_nm
from compressor.utils.fs import atomic_dir, atomic_path, atomic_write_json
from compressor.utils.logging import get_logger
from compressor.utils.run_folder import write_marker

log = get_logger(__name__)

MANIFEST_NAME = "manifest.json"
CHECKPOINT_FORMAT = "compressor.checkpoint.v1"
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


class TensorSource(Protocol):
    """What a shard job reads from: dense tensors by name (masks already applied). Must pickle."""

    def get(self, name: str) -> torch.Tensor: ...


def parse_size(value: str | int) -> int:
    """``"500MB"`` / ``"2GiB"`` / ``1000000`` -> bytes (decimal units: 1 MB = 10**6 B)."""
    if isinstance(value, int) and not isinstance(value, bool):
        size = value
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]I?B|B)?\s*", str(value), flags=re.IGNORECASE)
        if not match:
            raise ConfigError(f"shard size {value!r} is not a size such as '500MB', '2GB' or '512MiB'")
        size = int(float(match.group(1)) * _UNITS[(match.group(2) or "").upper()])
    if size < 1:
        raise ConfigError(f"shard size must be positive, got {value!r}")
    return size


@dataclass(frozen=True)
class TensorEntry:
    name: str  # tensor name in the source (a weight keeps its ``.weight`` name)
    shape: tuple[int, ...]
    stored_bytes: int  # bytes once written (compressed or dense)
    dense_bytes: int  # bytes of the dense tensor in the output dtype
    nm: Optional[NM] = None  # sparse layer: its N:M pattern is validated before writing
    compress: bool = False  # store as compressed / bitmask / shape


@dataclass(frozen=True)
class ShardPlan:
    file: str
    entries: tuple[TensorEntry, ...]

    @property
    def stored_bytes(self) -> int:
        return sum(e.stored_bytes for e in self.entries)


def make_entry(name: str, shape: Sequence[int], dtype: torch.dtype, nm: Optional[NM], compress: bool) -> TensorEntry:
    itemsize = torch.empty((), dtype=dtype).element_size()
    dense = itemsize * int(torch.Size(shape).numel())
    stored = compressed_nbytes((shape[0], shape[1]), nm, dtype) if compress and nm else dense
    return TensorEntry(name, tuple(shape), stored, dense, nm, bool(compress and nm))


def plan_shards(entries: Sequence[TensorEntry], max_bytes: int) -> list[ShardPlan]:
    """Fill shards in order up to ``max_bytes``; a tensor larger than that gets a shard of its own."""
    groups: list[list[TensorEntry]] = []
    size = 0
    for entry in entries:
        if not groups or (size + entry.stored_bytes > max_bytes and groups[-1]):
            groups.append([])
            size = 0
        groups[-1].append(entry)
        size += entry.stored_bytes
    count = max(len(groups), 1)
    return [
        ShardPlan(f"model-{i + 1:05d}-of-{count:05d}.safetensors", tuple(group)) for i, group in enumerate(groups)
    ]


@dataclass
class LayerStat:
    name: str
    shape: tuple[int, ...]
    kept: int  # non-zero entries
    dense_bytes: int
    stored_bytes: int
    compressed: bool


@dataclass
class ShardResult:
    file: str
    sha256: str
    file_bytes: int
    weight_map: dict[str, str] = field(default_factory=dict)  # stored tensor -> shard file
    tensor_bytes: int = 0
    layers: list[LayerStat] = field(default_factory=list)


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _convert(entry: TensorEntry, tensor: torch.Tensor, dtype: Optional[torch.dtype]) -> dict[str, torch.Tensor]:
    if tuple(tensor.shape) != entry.shape:
        raise CheckpointError(f"{entry.name}: source tensor has shape {tuple(tensor.shape)}, planned {entry.shape}")
    if dtype is not None and tensor.is_floating_point():
        tensor = tensor.to(dtype)
    if entry.nm is None:
        return {entry.name: tensor.contiguous()}
    try:
        if entry.compress:
            parts = compress_nm(tensor, entry.nm, entry.name)  # validates the pattern
            return {compressed_keys(entry.name)[suffix]: value for suffix, value in parts.items()}
        assert_nm(tensor, entry.nm, entry.name)
    except SparsityPatternError as exc:
        raise SparsityPatternError(f"{exc}. Export pruned weights, apply a mask file (--masks / --logits), or keep "
                                   "this layer dense (--ignore)") from None
    # Pruned entries are stored as +0.0 (W * mask leaves -0.0 for negative W) so exports are canonical.
    return {entry.name: tensor.masked_fill(tensor == 0, 0).contiguous()}


def write_shard(source: TensorSource, plan: ShardPlan, folder: str, dtype: Optional[str]) -> ShardResult:
    """The job of one shard: read, convert, validate, write atomically, hash. Runs on any worker."""
    out_dir = Path(folder)
    if not out_dir.is_dir():  # the export was abandoned: do not recreate its folder
        raise CheckpointError(f"export folder {out_dir} disappeared before shard {plan.file} was written")
    target = DTYPES[dtype] if dtype else None
    tensors: dict[str, torch.Tensor] = {}
    layers = []
    for entry in plan.entries:
        source_tensor = source.get(entry.name)
        stored = _convert(entry, source_tensor, target)
        tensors.update(stored)
        if entry.nm is not None:
            key = compressed_keys(entry.name)["compressed"] if entry.compress else entry.name
            weight = stored[key]
            layers.append(LayerStat(entry.name, entry.shape, int((weight != 0).sum()), entry.dense_bytes,
                                    sum(t.nbytes for t in stored.values()), entry.compress))
    from safetensors.torch import save_file

    with atomic_path(out_dir / plan.file) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
        digest, size = sha256_file(tmp), tmp.stat().st_size
    return ShardResult(plan.file, digest, size, {key: plan.file for key in tensors},
                       sum(t.nbytes for t in tensors.values()), layers)


def _run_jobs(executor: Executor, source: TensorSource, plans: Sequence[ShardPlan], folder: Path,
              dtype: Optional[str], progress: Optional[Callable[[ShardResult], None]]) -> list[ShardResult]:
    """One job per shard, at most a few in flight (bounded memory); waits for every job even on failure."""
    parallel = max(1, executor.parallelism)
    window = 1 if parallel == 1 else 2 * parallel
    results: list[ShardResult] = []
    pending: list[Any] = []
    try:
        for plan in plans:
            pending.append(executor.submit(write_shard, source, plan, str(folder), dtype))
            while len(pending) >= window:
                results.append(executor.gather([pending.pop(0)])[0])
                if progress:
                    progress(results[-1])
        while pending:
            results.append(executor.gather([pending.pop(0)])[0])
            if progress:
                progress(results[-1])
    except BaseException:
        for handle in pending:  # let running jobs finish before the folder is removed
            try:
                executor.gather([handle])
            except BaseException:
                pass
        raise
    return results


def write_checkpoint(
    source: TensorSource,
    out: str | Path,
    plans: Sequence[ShardPlan],
    config: dict[str, Any],
    manifest: Optional[dict[str, Any]],
    copy_files: Sequence[Path] = (),
    dtype: Optional[str] = None,
    executor: Optional[Executor] = None,
    overwrite: bool = False,
    progress: Optional[Callable[[ShardResult], None]] = None,
    mark: Optional[str] = None,
) -> list[ShardResult]:
    """Write the shards in parallel, then index, config and copied files, then the manifest (last; None:
    no manifest). ``mark``: the command whose output marker (``compressor.utils.run_folder``) it gets."""
    executor = executor or InProcessExecutor()
    with atomic_dir(out, replace=overwrite) as tmp:
        if mark:
            write_marker(tmp, mark)
        results = _run_jobs(executor, source, plans, tmp, dtype, progress)
        weight_map: dict[str, str] = {}
        for result in results:
            weight_map.update(result.weight_map)
        total = sum(r.tensor_bytes for r in results)
        atomic_write_json(tmp / INDEX_NAME, {"metadata": {"total_size": total},
                                             "weight_map": dict(sorted(weight_map.items()))})
        atomic_write_json(tmp / "config.json", config)
        for path in copy_files:
            shutil.copy2(path, tmp / path.name)
        if manifest is not None:
            shards = [{"file": r.file, "sha256": r.sha256, "bytes": r.file_bytes, "tensors": len(r.weight_map)}
                      for r in results]
            atomic_write_json(tmp / MANIFEST_NAME, {"format": CHECKPOINT_FORMAT, **manifest, "shards": shards,
                                                    "total_tensor_bytes": total})
    log.info("wrote %d shard(s) to %s", len(results), out)
    return results


def read_manifest(folder: str | Path) -> dict[str, Any]:
    folder = Path(folder)
    path = folder / MANIFEST_NAME
    if not path.is_file():
        raise CheckpointError(
            f"{folder} has no {MANIFEST_NAME}: the export did not finish (the manifest is written last) or the "
            "folder was not written by compressor; re-run the export"
        )
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc}); re-run the export") from exc
    if manifest.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: format {manifest.get('format')!r}, expected {CHECKPOINT_FORMAT!r}")
    return manifest
