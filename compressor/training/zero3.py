"""ZeRO-3 without whole-model copies: a model built partitioned and filled one parameter at a time, and
the final files written one layer at a time.

Loading (``load_partitioned_model``): the model is constructed inside ``Backend.model_init`` (DeepSpeed's
``zero.Init``: each module's parameters are partitioned as soon as that module is built, with
transformers' weight initialisation switched off, since every value is overwritten), then each parameter
is gathered on its own, rank 0 copies it from the folder's safetensors (a GGUF source is converted into
such a folder once, by rank 0), and leaving the gather broadcasts it and re-partitions it. At any moment
a rank holds its partitions plus one whole parameter.

Writing (``write_outputs_by_layer``): one pass over the modules, each gathered on its own, streams the
baked weights (W x hard mask) into ``model/model.safetensors``, the packed hard masks into
``masks.safetensors`` and the logits into ``logits.safetensors`` (``stream_safetensors``: header first,
tensors in order, renamed when complete), so rank 0 never holds more than one layer of any of them.
"""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
from torch import nn

from compressor.checkpoints.logits import logits_metadata, logits_shape
from compressor.checkpoints.masks import masks_metadata, packed_shape
from compressor.checkpoints.streaming import stream_safetensors
from compressor.errors import ModelLoadError, NonFiniteError, SparsityPatternError
from compressor.models.checks import all_finite
from compressor.models.config import ModelConfig
from compressor.models.loading import (
    LoadedModel, _is_compressed_export, load_hf_config, load_tokenizer, local_folder, resolve_source,
)
from compressor.precision import DTYPES
from compressor.sparsity import NM, pack_bits
from compressor.training.backends import Backend
from compressor.training.final_checks import MaskChecks
from compressor.utils.fs import atomic_dir
from compressor.utils.logging import get_logger

log = get_logger(__name__)


def load_partitioned_model(cfg: ModelConfig, backend: Backend) -> LoadedModel:
    """``load_model`` for a backend with ``partitioned_load``: no rank ever holds the whole model."""
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    from compressor.models.arch import get_arch
    from compressor.models.lazy import WeightStore, rebuild_rotary

    src = resolve_source(cfg.source, cfg.gguf_file, cfg.revision)
    if backend.is_main:
        local_folder(src)  # converts a GGUF source (once, into the cache) on one rank only
    backend.barrier()
    folder = local_folder(src)
    if _is_compressed_export(folder):
        raise ModelLoadError(f"{folder} is a compressed N:M export, which the partitioned ZeRO-3 load cannot read; "
                             f"convert it first: compressor export {folder} <new folder> --to dense")
    config = load_hf_config(folder, cfg.trust_remote_code)
    arch = get_arch(config)
    dtype = DTYPES[cfg.dtype]
    with no_init_weights(), backend.model_init(dtype):  # every value is loaded below: skip the random init
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=cfg.trust_remote_code)
    model.tie_weights()  # no_init_weights also skipped the tying that init_weights does
    rebuild_rotary(model, arch)  # its tables computed as a plain load computes them (outside zero.Init's dtype)
    fill_partitioned(model, arch, WeightStore(folder), backend)
    model.eval()
    return LoadedModel(model, load_tokenizer(folder, cfg.trust_remote_code), arch, src, folder)


def fill_partitioned(model: nn.Module, arch, store, backend: Backend) -> None:
    """Copy every parameter (and persistent buffer) of ``model`` from ``store``, one gathered parameter at
    a time; every name and shape is checked on every rank before anything is read."""
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    head, embed = f"{arch.lm_head}.weight", f"{arch.embed_tokens}.weight"
    # a tied weight comes once, under its first name; a head stored under the embedding's name is found there
    sources = {name: embed if name == head and tied and head not in store else name
               for name, _ in model.named_parameters()}
    missing = [n for n, k in sources.items() if k not in store]
    if missing:
        raise ModelLoadError(f"{store.folder} has no tensor for {len(missing)} parameters of the model, "
                             f"e.g. {missing[0]}; it holds another architecture or is incomplete")
    params = dict(model.named_parameters())
    for name, key in sources.items():
        want, have = tuple(backend.full_shape(params[name])), tuple(store.shape(key))
        if want != have:
            raise ModelLoadError(f"{store.folder}: {key} has shape {have}, the model's {name} is {want}")
    for name, key in sources.items():
        load_parameter(params[name], key, store, backend)
    for prefix, module in model.named_modules():  # buffers are never partitioned: every rank reads its own
        for key, buffer in _persistent_buffers(module):
            name = f"{prefix}.{key}" if prefix else key
            if name in store:
                buffer.copy_(store.get(name, buffer.dtype))
    _check_finite(model, backend)


@torch.no_grad()
def load_parameter(param: torch.Tensor, key: str, store, backend: Backend) -> None:
    """One parameter: gathered (whole on every rank), filled by rank 0, broadcast and re-partitioned."""
    with backend.gathered([param], write=True):
        if backend.is_main:
            param.copy_(store.get(key, param.dtype))


def _check_finite(model: nn.Module, backend: Backend) -> None:
    """Every rank checks its own partitions; all ranks stop together if any holds NaN or inf."""
    bad = [n for n, p in model.named_parameters() if not all_finite(_local(p))]
    flag = backend.all_mean(torch.tensor(float(bool(bad))))
    if float(flag) > 0:
        raise NonFiniteError(f"weight {bad[0] if bad else '(on another rank)'} holds NaN/inf values; the checkpoint "
                             "is corrupt or was saved from a diverged run - repair or re-export it before compressing")


def _local(param: torch.Tensor) -> torch.Tensor:
    """What this rank holds of ``param``: its ZeRO-3 partition, or the tensor itself."""
    return param.ds_tensor if getattr(param, "ds_tensor", None) is not None else param


def _modules(model: nn.Module, masks: Mapping[str, Any]):
    """(prefix, module, {key: own parameter}, mask or None) in module order; parametrization containers are
    read through the linear that owns them, and a tied parameter appears once (where it is met first)."""
    from torch.nn.utils.parametrize import ParametrizationList

    from compressor.methods.maskllm.mask import NMMaskParametrization

    seen: set[int] = set()
    for name, module in model.named_modules():
        if isinstance(module, (ParametrizationList, NMMaskParametrization)):
            continue
        own = {}
        for key, p in module.named_parameters(recurse=False):  # a parametrized weight is not among them
            if id(p) not in seen:
                seen.add(id(p))
                own[key] = p
        yield (f"{name}." if name else ""), module, own, masks.get(name)


def write_outputs_by_layer(out: Path, model: nn.Module, masks: Mapping[str, Any], backend: Backend, *,
                           tokenizer, checks: MaskChecks, mask_sparsity: Optional[str],
                           mask_levels: Optional[Mapping[str, str]], logits_sparsity: NM, mixed: bool
                           ) -> dict[str, Any]:
    """Write ``out/model`` (weights x hard mask), ``out/masks.safetensors`` and ``out/logits.safetensors``
    one module at a time (every rank takes part in the gathers; rank 0 writes) and return ``checks``'
    result (on rank 0; {} elsewhere). Broken masks stop every rank before anything is renamed into place."""
    walk = list(_modules(model, masks))
    model_entries, mask_entries, logit_entries = [], [], []
    for prefix, module, own, mask in walk:
        model_entries += [(prefix + k, p.dtype, tuple(backend.full_shape(p))) for k, p in own.items()]
        model_entries += [(prefix + k, b.dtype, tuple(b.shape)) for k, b in _persistent_buffers(module)]
        if mask is not None:
            original = module.parametrizations.weight.original
            model_entries.append((prefix + "weight", original.dtype, tuple(backend.full_shape(original))))
            mask_entries.append((prefix + "weight", torch.uint8, packed_shape(mask.shape)))
            logit_entries.append((prefix + "weight", torch.float32, logits_shape(*mask.shape, mask.nm)))
    per_layer = {prefix + "weight": mask.nm for prefix, _, _, mask in walk if mask is not None}
    main = backend.is_main
    with ExitStack() as stack:
        if main:
            folder = stack.enter_context(atomic_dir(out / "model", replace=True))
            write_model = stack.enter_context(stream_safetensors(folder / "model.safetensors", model_entries,
                                                                 {"format": "pt"}))
            write_mask = stack.enter_context(stream_safetensors(
                out / "masks.safetensors", mask_entries,
                masks_metadata({name: tuple(masks[name[: -len(".weight")]].shape) for name, _, _ in mask_entries},
                               mask_sparsity, mask_levels)))
            write_logits = stack.enter_context(stream_safetensors(
                out / "logits.safetensors", logit_entries,
                logits_metadata(per_layer, logits_sparsity, per_layer if mixed else None)))
        for prefix, module, own, mask in walk:
            extra = [module.parametrizations.weight.original, mask.logits] if mask is not None else []
            with backend.gathered(list(own.values()) + extra):
                if not main:
                    continue
                for key, p in own.items():
                    write_model(prefix + key, p.detach())
                for key, b in _persistent_buffers(module):
                    write_model(prefix + key, b)
                if mask is not None:
                    weight, hard = extra[0].detach(), mask.hard_mask()
                    write_model(prefix + "weight", weight * hard.to(weight.dtype))
                    write_mask(prefix + "weight", pack_bits(hard.cpu()))
                    write_logits(prefix + "weight", mask.logits.detach().float())
                    checks.add(prefix + "weight", hard)
        error = checks.error() if main else None
        if float(backend.all_mean(torch.tensor(float(error is not None)))) > 0:
            raise error or SparsityPatternError("rank 0 found final masks that break their N:M pattern")
        if main:
            model.config.architectures = [type(model).__name__]
            model.config.save_pretrained(folder)
            if model.can_generate() and getattr(model, "generation_config", None) is not None:
                model.generation_config.save_pretrained(folder)
            tokenizer.save_pretrained(folder)
    return checks.result() if main else {}


def _persistent_buffers(module: nn.Module):
    return [(k, b) for k, b in module.named_buffers(recurse=False) if k not in module._non_persistent_buffers_set]


