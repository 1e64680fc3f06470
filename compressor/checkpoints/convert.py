"""Convert between checkpoint formats: a run's output, HF dense-with-zeros folders, compressed N:M shards.

A *reader* turns a path into a source: ``names``, ``info(name)`` (shape, dtype), ``get(name)`` (a dense
tensor, masks applied), ``nm``, ``config()``, ``support_files()`` and ``weight_files()``, always with
transformers tensor names. A *writer* turns a source into files. A new format (e.g. Megatron
distributed checkpoints) is one more entry in ``READERS`` and/or ``WRITERS``.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Optional, Union

import torch
from pydantic import field_validator

from compressor.checkpoints.load import CheckpointReader
from compressor.checkpoints.logits import logits_levels, logits_sparsity, logits_to_masks
from compressor.checkpoints.masks import FORMAT as MASKS_FORMAT
from compressor.checkpoints.masks import metadata_levels
from compressor.checkpoints.sharded import (
    DTYPES, MANIFEST_NAME, ShardResult, make_entry, parse_size, plan_shards, write_checkpoint,
)
from compressor.config.base import StrictModel
from compressor.errors import CheckpointError, ConfigError
from compressor.execution.base import Executor
from compressor.sparsity.bitpack import unpack_bits
from compressor.sparsity.nm import NM, SparsityTarget, check_divisible
from compressor.sparsity.plan import level_text
from compressor.utils.logging import get_logger
from compressor.utils.run_folder import check_output_target

log = get_logger(__name__)

SUPPORT_FILES = ("tokenizer*", "special_tokens_map.json", "added_tokens.json", "generation_config.json",
                 "vocab.json", "merges.txt", "*.model", "*.jinja", "chat_template*")
Progress = Callable[[ShardResult, int, int], None]  # (finished shard, shards done, shards total)


class ExportOptions(StrictModel):
    format: Literal["compressed", "dense"] = "compressed"
    sparsity: Optional[NM] = None  # default: the masks'/logits'/source's, else 2:4
    dtype: Optional[Literal["float32", "float16", "bfloat16"]] = None  # default: the source's
    shard_size: Union[int, str] = "500MB"
    targets: tuple[str, ...] = (".*",)  # regexes on linear names, as in pruning configs
    ignore: tuple[str, ...] = ()
    overwrite: bool = False
    # read a source without a valid manifest as it is, unchecked; the output then gets no manifest either
    trust_unverified: bool = False

    @field_validator("targets", "ignore")
    @classmethod
    def _regexes(cls, patterns: tuple[str, ...]) -> tuple[str, ...]:
        for p in patterns:
            try:
                re.compile(p)
            except re.error as exc:
                raise ValueError(f"{p!r} is not a regular expression ({exc})") from None
        return patterns


class MaskedSource:
    """A checkpoint folder's tensors with a run's masks (or learned logits' argmax) applied: W * mask."""

    def __init__(self, base: CheckpointReader, masks: Optional[Path] = None, logits: Optional[Path] = None) -> None:
        if masks is not None and logits is not None:
            raise ConfigError(f"give masks ({masks}) or logits ({logits}), not both")
        self.base, self.masks, self.logits = base, masks, logits
        self.nm = base.nm
        # weight name -> level, from a run with a sparsity plan (or a mixed export); None: uniform
        self.levels: Optional[dict[str, SparsityTarget]] = base.levels
        self._mask_names: set[str] = set()
        if masks is not None:
            self._mask_names, meta = _keys_and_metadata(masks)
            if meta.get("format") != MASKS_FORMAT:
                raise CheckpointError(f"{masks} is not a compressor mask file (format {meta.get('format')!r})")
            self._shapes = json.loads(meta["shapes"])
            if meta.get("sparsity", "").count(":") == 1:  # N:M masks; unstructured ones say e.g. "0.5"
                self.nm = NM.parse(meta["sparsity"])
            self.levels = metadata_levels(meta, masks)
        elif logits is not None:
            self.nm = logits_sparsity(logits)
            self._mask_names, meta = _keys_and_metadata(logits)
            self.levels = logits_levels(logits) if "levels" in meta else None
        unknown = sorted(self._mask_names - set(base.names))
        if unknown:
            raise CheckpointError(f"{masks or logits} has masks for tensors the model lacks: {unknown[:3]}")

    folder = property(lambda self: self.base.folder)
    names = property(lambda self: self.base.names)
    verification = property(lambda self: self.base.verification)

    def info(self, name: str) -> tuple[tuple[int, ...], torch.dtype]:
        return self.base.info(name)

    def mask(self, name: str) -> Optional[torch.Tensor]:
        """(out, in) bool mask of ``name``, or None if the run did not prune it."""
        if name not in self._mask_names:
            return None
        from safetensors import safe_open

        path = self.masks or self.logits
        try:
            with safe_open(str(path), framework="pt") as fh:
                raw = fh.get_tensor(name)
        except Exception as exc:  # safetensors raises several types for truncated / corrupt files
            raise CheckpointError(f"{path}: cannot read the mask of {name} ({exc})") from exc
        if self.masks is not None:
            rows, cols = self._shapes[name][:-1], self._shapes[name][-1]
            return unpack_bits(raw, cols).reshape(*rows, cols)
        return logits_to_masks({name: raw}, self.levels or self.nm)[name]

    def get(self, name: str) -> torch.Tensor:
        tensor = self.base.get(name)
        mask = self.mask(name)
        if mask is None:
            return tensor
        if mask.shape != tensor.shape:
            raise CheckpointError(f"mask of {name} has shape {tuple(mask.shape)}, the weight {tuple(tensor.shape)}")
        return torch.where(mask, tensor, torch.zeros((), dtype=tensor.dtype))  # +0.0 where pruned

    def config(self) -> dict[str, Any]:
        return json.loads((self.folder / "config.json").read_text())

    def support_files(self) -> list[Path]:
        found = {p for pattern in SUPPORT_FILES for p in self.folder.glob(pattern) if p.is_file()}
        return sorted(found)

    def weight_files(self) -> list[Path]:
        return sorted({self.folder / f for f in self.base.stored.values()})


def _keys_and_metadata(path: Path) -> tuple[set[str], dict[str, str]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            return set(fh.keys()), fh.metadata() or {}
    except Exception as exc:
        raise CheckpointError(f"cannot read {path}: {exc}") from exc


# --- readers ---------------------------------------------------------------------------------------
def _is_checkpoint(path: Path) -> bool:
    return (path / MANIFEST_NAME).is_file()


def read_checkpoint(path: Path, masks: Optional[Path] = None, logits: Optional[Path] = None,
                    verify: bool = True) -> MaskedSource:
    """Our compressed or dense sharded export (checksums verified first), or any HF safetensors folder
    (verified in full as it is read; see ``compressor.checkpoints.load``)."""
    reader = CheckpointReader(path, verify=verify)
    if reader.verification == "sha256":
        reader.verify()
    return MaskedSource(reader, masks, logits)


def read_run(path: Path, masks: Optional[Path] = None, logits: Optional[Path] = None,
             verify: bool = True) -> MaskedSource:
    """A compressor run folder: ``model/`` plus ``masks.safetensors`` or ``logits.safetensors``."""
    if not (path / "model" / "config.json").is_file():
        raise CheckpointError(f"run folder {path} has no model/ (run with save_model: true, or convert the base "
                              "model folder with --masks)")
    if masks is None and logits is None:  # a learned-mask run may hold both: its final masks win
        if (path / "masks.safetensors").is_file():
            masks = path / "masks.safetensors"
        elif (path / "logits.safetensors").is_file():
            logits = path / "logits.safetensors"
        elif (path / "checkpoints" / "latest").is_file():  # an unfinished distributed run: its last checkpoint
            logits = _dist_checkpoint_logits(path)
    return read_checkpoint(path / "model", masks, logits, verify)


def _dist_checkpoint_logits(run: Path) -> Path:
    """The latest `compressor launch` checkpoint's logits as a logits file (in a temporary folder)."""
    import tempfile

    from compressor.checkpoints.logits import load_dist_logits, save_logits
    from compressor.config.base import read_yaml
    from compressor.training.checkpoint import latest_checkpoint

    step = latest_checkpoint(run / "checkpoints")
    config = read_yaml(run / "config.yaml") if (run / "config.yaml").is_file() else {}
    sparsity = (config.get("maskllm") or {}).get("sparsity", "2:4")
    out = Path(tempfile.mkdtemp(prefix="compressor-logits-")) / "logits.safetensors"
    save_logits(out, load_dist_logits(step), sparsity)
    log.info("read the logits of %s (no final masks in %s yet)", step, run)
    return out


READERS: dict[str, Callable[..., MaskedSource]] = {"run": read_run, "checkpoint": read_checkpoint}


def detect_format(path: Path) -> str:
    run_files = ("model", "masks.safetensors", "logits.safetensors")
    if any((path / f).exists() for f in run_files) and not (path / "config.json").is_file():
        return "run"
    if (path / "config.json").is_file():
        return "checkpoint"
    raise CheckpointError(f"{path} is neither a run folder (model/ + masks) nor a model folder (config.json)")


def open_source(path: str | Path, masks: Optional[str | Path] = None, logits: Optional[str | Path] = None,
                fmt: Optional[str] = None, verify: bool = True) -> MaskedSource:
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a folder")
    for extra in (masks, logits):
        if extra is not None and not Path(extra).is_file():
            raise CheckpointError(f"{extra} does not exist")
    return READERS[fmt or detect_format(path)](path, Path(masks) if masks else None,
                                               Path(logits) if logits else None, verify)


# --- writers ---------------------------------------------------------------------------------------
@dataclass
class ExportSummary:
    source: str
    output: str
    format: str
    sparsity: str
    dtype: str
    shards: int
    sparse_layers: int
    sparse_density: float  # non-zero fraction of the sparse layers
    linear_dense_bytes: int  # sparse layers, dense, in the output dtype
    linear_stored_bytes: int
    dense_bytes: int  # every tensor, dense, in the output dtype
    stored_bytes: int  # tensor bytes written
    source_file_bytes: int
    output_file_bytes: int
    seconds: float
    layers: list[dict[str, Any]] = field(default_factory=list)
    written: dict[str, list[str]] = field(default_factory=dict)  # how each sparse layer was stored -> names

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def sparse_weight_names(folder: Path, targets: tuple[str, ...] = (".*",), ignore: tuple[str, ...] = ()
                        ) -> tuple[list[str], list[str]]:
    """(every decoder linear, those chosen by ``targets``/``ignore`` as in pruning configs), as weight names."""
    from compressor.models.arch import get_arch
    from compressor.models.layers import prunable_linears
    from compressor.models.loading import meta_model

    model = meta_model(folder)
    arch = get_arch(model.config)
    every = [f"{t.name}.weight" for t in prunable_linears(model, arch)]
    return every, [f"{t.name}.weight" for t in prunable_linears(model, arch, targets, ignore)]


def _natural(name: str) -> list:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def _output_config(source: MaskedSource, options: ExportOptions, levels: dict[str, SparsityTarget], dtype: str,
                   sparse: list[str], linears: list[str]) -> dict:
    config = source.config()
    config.pop("quantization_config", None)
    config["dtype"] = dtype
    if "torch_dtype" in config:
        config["torch_dtype"] = dtype
    # only when every stored-sparse layer is 2:4 can compressed-tensors read the folder
    if options.format == "compressed" and all(levels[n] == NM(2, 4) for n in sparse):
        # compressed-tensors (<= 0.14) and vLLM (<= 0.19) read this. All decoder linears sparse: the usual
        # ["Linear"] minus lm_head; otherwise the exact module names.
        layers = [n[: -len(".weight")] for n in sorted(sparse, key=_natural)]
        everything = set(sparse) == set(linears)
        config["quantization_config"] = {
            "quant_method": "compressed-tensors",
            "sparsity_config": {"format": "sparse-24-bitmask", "sparsity_structure": "2:4",
                                "targets": ["Linear"] if everything else layers, "ignore": ["lm_head"]},
        }
    return config


def write_sharded(source: MaskedSource, out: Path, options: ExportOptions, executor: Optional[Executor] = None,
                  progress: Optional[Progress] = None) -> ExportSummary:
    """Compressed (N:M values + bitmask) or dense-with-zeros shards, with index, manifest and config."""
    start = time.perf_counter()
    nm = options.sparsity or source.nm or NM(2, 4)
    linears, chosen = sparse_weight_names(source.folder, options.targets, options.ignore)
    # each chosen layer's level: --sparsity for all, else the run's per-layer levels, else one N:M
    levels = {n: options.sparsity or (source.levels or {}).get(n, nm) for n in chosen}
    mixed = options.sparsity is None and source.levels is not None and set(levels.values()) != {nm}
    entries, dtypes = [], []
    for name in sorted(source.names, key=_natural):
        shape, src_dtype = source.info(name)
        dtype = DTYPES[options.dtype] if options.dtype and src_dtype.is_floating_point else src_dtype
        dtypes.append(dtype)
        level = levels.get(name)
        if isinstance(level, NM):
            check_divisible(shape[-1], level.m, f"{name} (leave it out with --ignore)")
        # unstructured layers have no N:M pattern to store or check: dense with zeros
        entries.append(make_entry(name, shape, dtype, level if isinstance(level, NM) else None,
                                  options.format == "compressed"))
    floats = [d for d in dtypes if d.is_floating_point]
    dtype_name = options.dtype or next((k for k, v in DTYPES.items() if floats and v == floats[0]), "float32")
    plans = plan_shards(entries, parse_size(options.shard_size))
    done = [0]

    def on_shard(result: ShardResult) -> None:
        done[0] += 1
        if progress:
            progress(result, done[0], len(plans))

    sparse_names = [e.name for e in entries if e.nm is not None]
    written = _written(entries, levels)
    # A manifest vouches for the data: only over a source that was verified (its own manifest, or in full)
    manifest = None
    if mixed and source.verification == "none" and options.format == "compressed":
        raise ConfigError(f"{source.folder} has mixed per-layer levels: a compressed export records each layer's N:M "
                          "in its manifest, which an unverified export does not get; drop --trust-unverified, or "
                          "export with --to dense")
    if source.verification != "none":
        manifest = {"layout": options.format, "sparsity": "mixed" if mixed else str(nm), "dtype": dtype_name,
                    "sparse_layers": sparse_names, "source": str(source.folder),
                    "source_verification": source.verification}
        if mixed:  # every chosen layer's level, including the unstructured ones stored dense
            manifest["levels"] = {n: level_text(lv) for n, lv in sorted(levels.items(), key=lambda kv: _natural(kv[0]))}
    else:
        log.warning("%s was read unverified (--trust-unverified): %s gets no manifest, and is verified in full "
                    "whenever it is read", source.folder, out)
    results = write_checkpoint(
        source, out, plans,
        _output_config(source, options, levels, dtype_name, sparse_names, linears), manifest,
        source.support_files(), options.dtype, executor, options.overwrite, on_shard, mark="export",
    )
    layers = sorted((layer for r in results for layer in r.layers), key=lambda s: _natural(s.name))
    numel = sum(int(torch.Size(s.shape).numel()) for s in layers)
    return ExportSummary(
        source=str(source.folder), output=str(out), format=options.format, sparsity="mixed" if mixed else str(nm),
        dtype=dtype_name,
        shards=len(results), sparse_layers=len(layers),
        sparse_density=sum(s.kept for s in layers) / max(numel, 1),
        linear_dense_bytes=sum(s.dense_bytes for s in layers), linear_stored_bytes=sum(s.stored_bytes for s in layers),
        dense_bytes=sum(e.dense_bytes for e in entries), stored_bytes=sum(r.tensor_bytes for r in results),
        source_file_bytes=sum(p.stat().st_size for p in source.weight_files()),
        output_file_bytes=sum(r.file_bytes for r in results), seconds=time.perf_counter() - start,
        layers=[asdict(s) for s in layers], written=written,
    )


def _written(entries: list, levels: dict[str, SparsityTarget]) -> dict[str, list[str]]:
    """How each chosen layer is stored: the export's message and summary."""
    out: dict[str, list[str]] = {}
    for e in entries:
        if e.name not in levels:
            continue
        if e.compress:
            how = "sparse-24-bitmask" if e.nm == NM(2, 4) else f"{e.nm} bitmask (compressor layout)"
        elif e.nm is not None:
            how = f"dense with zeros ({e.nm} checked)"
        else:
            how = f"dense with zeros (unstructured {level_text(levels[e.name])})"
        out.setdefault(how, []).append(e.name)
    return out


WRITERS: dict[str, Callable[..., ExportSummary]] = {"compressed": write_sharded, "dense": write_sharded}


def convert_checkpoint(src: str | Path, out: str | Path, options: ExportOptions = ExportOptions(),
                       masks: Optional[str | Path] = None, logits: Optional[str | Path] = None,
                       executor: Optional[Executor] = None, progress: Optional[Progress] = None) -> ExportSummary:
    """Read ``src`` (run folder, HF folder or our sharded export), write ``out`` in ``options.format``.

    ``out`` is refused if it overlaps any input (also the files a run's ``model/`` links to), or if it
    exists and is not an earlier output of compressor (``--overwrite`` replaces only those, after the
    new folder is complete).
    """
    check_output_target(out, options.overwrite, export_inputs(src, masks, logits))
    source = open_source(src, masks, logits, verify=not options.trust_unverified)
    return WRITERS[options.format](source, Path(out), options, executor, progress)


def export_inputs(src: str | Path, masks: Optional[str | Path], logits: Optional[str | Path]) -> dict[str, Path]:
    """What an export reads: the source, mask / logits files, and the targets of files its model links to."""
    inputs: dict[str, Path] = {"export source": Path(src)}
    if masks:
        inputs["--masks file"] = Path(masks)
    if logits:
        inputs["--logits file"] = Path(logits)
    for folder in (Path(src), Path(src) / "model"):
        if folder.is_dir():
            for f in folder.iterdir():
                if f.is_symlink():
                    inputs[f"folder {f.resolve().parent} (linked from {f})"] = f.resolve().parent
    return inputs


def _mb(n: int) -> str:
    return f"{n / 1e6:,.1f} MB"


def format_summary(s: ExportSummary) -> str:
    ratio = s.linear_stored_bytes / max(s.linear_dense_bytes, 1)
    return "\n".join([
        f"{s.source} -> {s.output} ({s.format}, {s.dtype}, {s.sparsity}, {s.shards} shard(s), {s.seconds:.1f} s)",
        f"  sparse layers : {s.sparse_layers}, density {s.sparse_density:.4f} (sparsity {1 - s.sparse_density:.4f})",
        f"  sparse linears: {_mb(s.linear_dense_bytes)} dense -> {_mb(s.linear_stored_bytes)} stored ({ratio:.4f}x)",
        f"  all tensors   : {_mb(s.dense_bytes)} dense -> {_mb(s.stored_bytes)} stored "
        f"({s.stored_bytes / max(s.dense_bytes, 1):.4f}x)",
        f"  files         : {_mb(s.source_file_bytes)} before -> {_mb(s.output_file_bytes)} after",
        *(f"  {how}: {len(names)} layer(s), e.g. {names[0]}" for how, names in s.written.items() if s.sparsity == "mixed"),
        *([f"  mixed levels: readable by load_compressed_model and `compressor export --to dense` "
           "(compressed-tensors reads only all-2:4 exports)"]
          if s.sparsity == "mixed" and s.format == "compressed" else []),
    ])
