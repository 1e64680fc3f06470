"""Learnable N:M masks on megatron-core's Column/RowParallelLinear, one shard of logits per TP rank.

The mask is ``NMMaskParametrization`` unchanged, registered on each rank's local weight:

- column-parallel (fused QKV, fused gate/up): the rank owns the logits of its output rows;
- row-parallel (attention output, down projection): it owns the logits of its input columns, so the
  shard width must be a multiple of M (a group of M may not straddle two ranks: checked, by name).

Mask logits are rows x groups of input columns, so the HF <-> megatron row/column maps of
``megatron_convert`` move them exactly as they move weights. Everything that leaves a rank (priors
coming in; checkpoints, gathered logits and masks going out) is therefore named and shaped as in
the HF model: ``model.layers.3.self_attn.q_proj.weight`` (out, in / M, C(M, N)).

Seeds and layouts:

- Initial logits are those of the single-process trainer, whatever the layout: each HF layer's
  logits are drawn with ``layer_seed(seed, <HF module name>)`` (as ``attach_masks`` does), the
  prior is added on the full HF layer, and the rank keeps its shard. A run at TP=2 therefore starts
  from exactly the logits of a run at TP=1 (costs one HF layer of logits, transiently, per layer).
- Gumbel noise is drawn per shard, from a generator seeded with the global layer name, the TP shard
  and the data-parallel rank: data-parallel replicas sample different masks (more samples per step),
  and layouts differ in their noise. Exact comparisons across layouts (tests) therefore use hard
  masks, or soft masks with the noise switched off (``compressor.methods.maskllm.set_noise(masks,
  False)``): then loss and logits gradients match a single process within float tolerance.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Iterator, Mapping, Optional, Sequence

import torch
import torch.distributed as dist
from torch.nn.utils import parametrize

from compressor.errors import ConfigError, SparsityPatternError
from compressor.methods.maskllm.attach import layer_seed
from compressor.methods.maskllm.config import MaskLLMConfig
from compressor.methods.maskllm.mask import NMMaskParametrization
from compressor.precision import DTYPES
from compressor.parallel.megatron_convert import (
    LINEARS, LinearKind, LlamaDims, check_parallel_sizes, hf_layer, join_local, shard_hf, split_local,
)
from compressor.parallel.megatron_model import Layout
from compressor.sparsity import NM
from compressor.sparsity.plan import PlanError


@dataclass
class ShardedMask:
    """One megatron linear's mask on this rank."""

    name: str  # global megatron name, e.g. "decoder.layers.3.mlp.linear_fc2" (PP-independent)
    module_path: str  # inside this stage's model (local layer index)
    kind: LinearKind
    layer: int  # global (HF) layer index
    mask: NMMaskParametrization

    @property
    def hf_modules(self) -> tuple[str, ...]:
        return tuple(f"{hf_layer(self.layer)}.{h}" for h in self.kind.hf)

    @property
    def hf_weights(self) -> tuple[str, ...]:
        return tuple(f"{m}.weight" for m in self.hf_modules)


MaskSet = dict[str, ShardedMask]  # by global megatron name


def as_mask_dict(masks: MaskSet) -> dict[str, NMMaskParametrization]:
    """The ``{name: NMMaskParametrization}`` view the helpers of ``compressor.methods.maskllm`` take."""
    return {name: s.mask for name, s in masks.items()}


# -- shapes ---------------------------------------------------------------------------------------
def local_shape(kind: LinearKind, dims: LlamaDims, tp: int) -> tuple[int, int]:
    """(out, in) of the rank's weight shard of ``kind``."""
    full = {"linear_qkv": (dims.qkv_rows, dims.hidden), "linear_proj": (dims.hidden, dims.heads * dims.head_dim),
            "linear_fc1": (2 * dims.ffn, dims.hidden), "linear_fc2": (dims.hidden, dims.ffn)}
    out, inp = full[kind.path.rsplit(".", 1)[-1]]
    return (out // tp, inp) if kind.split_dim == 0 else (out, inp // tp)


LevelOf = Callable[[int, LinearKind], NM]  # (global layer, linear) -> its N:M


def check_tp_mask_shapes(dims: LlamaDims, tp: int, nm: NM | LevelOf, layers: Optional[Sequence[int]] = None) -> None:
    """Every masked shard's input width must be a multiple of its M, so no group of M straddles two TP ranks.
    ``nm``: one N:M for all, or each linear's own (a mixed sparsity plan)."""
    level_of = nm if callable(nm) else (lambda i, kind: nm)
    for i in layers if layers is not None else range(dims.layers):
        for kind in LINEARS:
            m = level_of(i, kind).m
            out, width = local_shape(kind, dims, tp)
            if width % m:
                full = width * tp if kind.split_dim == 1 else width
                hf = ", ".join(f"{hf_layer(i)}.{h}" for h in kind.hf)
                raise SparsityPatternError(
                    f"decoder.layers.{i}.{kind.path} ({hf}): its input width {full} split over tensor_parallel={tp} "
                    f"gives {width} columns per rank, not a multiple of M={m}, so groups of {m} would straddle "
                    f"the shard boundary; choose a tensor_parallel size that divides {full // m} groups evenly"
                )


def hf_linear_shapes(dims: LlamaDims, chosen: Sequence[tuple[int, LinearKind]]) -> dict[str, tuple[int, int]]:
    """``{HF linear name: (out, in)}`` of the ``chosen`` megatron linears (``select_linears``), in model
    order: what a sparsity plan is resolved against (as ``prunable_linears`` gives it for an HF model)."""
    return {f"{hf_layer(i)}.{rel}": hf_linear_shape(rel, dims) for i, kind in chosen for rel in kind.hf}


def fused_level_of(levels: Mapping[str, NM], default: NM) -> LevelOf:
    """Each megatron linear's N:M from a plan's levels by HF linear name. A fused linear (QKV, gate/up) has
    one mask, so its HF linears must share a level: else a PlanError names them. Linears the plan does not
    list (not selected by targets) get ``default``; they are not masked."""
    def level_of(i: int, kind: LinearKind) -> NM:
        names = [f"{hf_layer(i)}.{h}" for h in kind.hf]
        got = {n: levels[n] for n in names if n in levels}
        if not got:
            return default
        if len(set(got.values())) > 1:
            listed = ", ".join(f"{n} {lv}" for n, lv in got.items())
            raise PlanError(f"the sparsity plan gives the linears megatron fuses into decoder.layers.{i}.{kind.path} "
                            f"different levels ({listed}); they share one mask there: give them one level, or "
                            "learn this plan with `compressor learn` (single process or deepspeed)")
        return next(iter(got.values()))

    return level_of


# -- which linears ---------------------------------------------------------------------------------
def select_linears(dims: LlamaDims, layers: Sequence[int], targets: Sequence[str], ignore: Sequence[str]
                   ) -> list[tuple[int, LinearKind]]:
    """The megatron linears to mask: those whose HF linears all match ``targets`` and none ``ignore``.

    A fused linear (QKV, gate/up) is masked whole: selecting only some of its HF linears is an error.
    """
    def wanted(name: str) -> bool:
        return any(re.fullmatch(p, name) for p in targets) and not any(re.fullmatch(p, name) for p in ignore)

    chosen = []
    for i in layers:
        for kind in LINEARS:
            names = [f"{hf_layer(i)}.{h}" for h in kind.hf]
            picks = [wanted(n) for n in names]
            if all(picks):
                chosen.append((i, kind))
            elif any(picks):
                raise ConfigError(
                    f"targets/ignore select only some of {', '.join(names)}; megatron fuses them into "
                    f"decoder.layers.{i}.{kind.path}, which is masked whole: select all of them or none")
    return chosen


# -- attach ----------------------------------------------------------------------------------------
def noise_seed(seed: int, name: str, layout: Layout) -> int:
    return layer_seed(seed, f"{name}|tp{layout.tp_rank}of{layout.tp_size}|dp{layout.dp_rank}")


def initial_hf_logits(kind: LinearKind, layer: int, dims: LlamaDims, cfg: MaskLLMConfig, seed: int,
                      priors: Optional[Mapping[str, torch.Tensor]], nm: Optional[NM] = None) -> list[torch.Tensor]:
    """The full-layer initial logits of each HF linear of ``kind`` at ``nm`` (default ``cfg.sparsity``):
    what ``attach_masks`` would start from."""
    out = []
    for rel in kind.hf:
        module = f"{hf_layer(layer)}.{rel}"
        rows, cols = hf_linear_shape(rel, dims)
        full = NMMaskParametrization(rows, cols, nm or cfg.sparsity, init_std=cfg.init_std,
                                     dtype=DTYPES[cfg.logits_dtype], seed=layer_seed(seed, module), name=module)
        if priors is not None:
            full.init_from_prior(_prior(priors, module), cfg.prior_strength)
        out.append(full.logits.detach())
    return out


def hf_linear_shape(rel: str, dims: LlamaDims) -> tuple[int, int]:
    """(out, in) of an HF linear, by its name inside a decoder layer ("mlp.down_proj")."""
    return {"self_attn.q_proj": (dims.heads * dims.head_dim, dims.hidden),
            "self_attn.k_proj": (dims.kv_heads * dims.head_dim, dims.hidden),
            "self_attn.v_proj": (dims.kv_heads * dims.head_dim, dims.hidden),
            "self_attn.o_proj": (dims.hidden, dims.heads * dims.head_dim),
            "mlp.gate_proj": (dims.ffn, dims.hidden), "mlp.up_proj": (dims.ffn, dims.hidden),
            "mlp.down_proj": (dims.hidden, dims.ffn)}[rel]


def _prior(priors: Mapping[str, torch.Tensor], module: str) -> torch.Tensor:
    for key in (f"{module}.weight", module):
        if key in priors:
            return priors[key]
    raise ConfigError(f"the prior has no mask for {module}.weight; it was made for other targets or another model")


def attach_sharded_masks(
    model: torch.nn.Module,
    dims: LlamaDims,
    layout: Layout,
    cfg: MaskLLMConfig,
    seed: int = 0,
    priors: Optional[Mapping[str, torch.Tensor]] = None,
    targets: Sequence[str] = (".*",),
    ignore: Sequence[str] = (),
    levels: Optional[Mapping[str, NM]] = None,
) -> MaskSet:
    """Mask this rank's Column/RowParallelLinear weights; ``priors`` are full (out, in) masks by HF weight name.
    ``levels``: each HF linear's own N:M (a mixed sparsity plan, by module name); default ``cfg.sparsity``.

    Every model parameter is frozen; masks start in eval (hard) mode, like ``attach_masks``.
    """
    if cfg.train_weights:
        raise ConfigError("maskllm.train_weights is not supported by the megatron trainer (weights stay frozen)")
    check_parallel_sizes(dims, layout.tp_size, layout.pp_size)
    layers = list(layout.shard.layers(dims))
    level_of = fused_level_of(levels, cfg.sparsity) if levels else (lambda i, kind: cfg.sparsity)
    check_tp_mask_shapes(dims, layout.tp_size, level_of, layers)
    chosen = select_linears(dims, layers, targets, ignore)
    if not chosen:
        raise ConfigError("targets/ignore select no linear of this pipeline stage; mask at least one per stage")
    offset = layout.shard.layer_offset(dims)
    masks: MaskSet = {}
    for i, kind in chosen:
        module_path = f"decoder.layers.{i - offset}.{kind.path}"
        name = f"decoder.layers.{i}.{kind.path}"
        weight = model.get_submodule(module_path).weight
        if tuple(weight.shape) != local_shape(kind, dims, layout.tp_size):
            raise RuntimeError(f"{module_path}: weight shard {tuple(weight.shape)}, expected "
                               f"{local_shape(kind, dims, layout.tp_size)}")
        nm = level_of(i, kind)
        mask = NMMaskParametrization(weight.shape[0], weight.shape[1], nm, init_std=cfg.init_std,
                                     dtype=DTYPES[cfg.logits_dtype], seed=noise_seed(seed, name, layout), name=name,
                                     device=weight.device)
        if not weight.is_meta:  # a meta-device model (shape proofs) has no values to start from
            full = initial_hf_logits(kind, i, dims, cfg, seed, priors, nm)
            mask.load_logits(shard_hf(kind, full, dims, layout.tp_size, layout.tp_rank), what="initial logits")
        masks[name] = ShardedMask(name, module_path, kind, i, mask)
    for p in model.parameters():
        p.requires_grad_(False)
    for s in masks.values():
        parametrize.register_parametrization(model.get_submodule(s.module_path), "weight", s.mask)
        s.mask.train(False)
    return masks


def masked_forward():
    """Wrap each forward pass: megatron's ColumnParallelLinear reads ``self.weight`` twice, and without the
    parametrization cache every read would draw (and pay for) a new mask sample. (A held sample,
    ``hold_samples``, is served to every read as it is, with or without the cache.)"""
    return parametrize.cached()


def original_weights(model: torch.nn.Module, masks: MaskSet) -> dict[str, torch.Tensor]:
    """{global mask name: this rank's unmasked weight shard (out, in)}, what ``hold_samples`` multiplies."""
    return {name: model.get_submodule(s.module_path).parametrizations.weight.original for name, s in masks.items()}


# -- HF-named pieces of the local shards ----------------------------------------------------------
@dataclass(frozen=True)
class Piece:
    """This rank's part of one HF-named tensor: ``tensor`` is chunk ``rank`` of ``parts`` along ``dim``."""

    hf_name: str
    tensor: torch.Tensor
    dim: int
    rank: int
    parts: int


def local_pieces(masks: MaskSet, dims: LlamaDims, layout: Layout,
                 tensor_of: Callable[[NMMaskParametrization], torch.Tensor]) -> Iterator[Piece]:
    """Split ``tensor_of(mask)`` (rows first: logits, their gradient, a hard mask...) into HF-named pieces."""
    for s in masks.values():
        parts = split_local(s.kind, tensor_of(s.mask), dims, layout.tp_size)
        for hf_name, part in zip(s.hf_weights, parts):
            yield Piece(hf_name, part, s.kind.split_dim, layout.tp_rank, layout.tp_size)


def join_pieces(s: ShardedMask, by_name: Mapping[str, torch.Tensor], dims: LlamaDims, layout: Layout) -> torch.Tensor:
    """This rank's local tensor of ``s`` from its HF-named pieces (inverse of ``local_pieces``)."""
    return join_local(s.kind, [by_name[n] for n in s.hf_weights], dims, layout.tp_size)


@torch.no_grad()
def load_hf_logits(masks: MaskSet, logits: Mapping[str, torch.Tensor], dims: LlamaDims, layout: Layout) -> None:
    """Set the logits from full HF-named logits (an earlier run's logits.safetensors, or a test's)."""
    for s in masks.values():
        missing = [n for n in s.hf_weights if n not in logits]
        if missing:
            raise ConfigError(f"the logits have no entry for {missing[0]}; they were learned for another model "
                              "or targets")
        full = [logits[n] for n in s.hf_weights]
        s.mask.load_logits(shard_hf(s.kind, full, dims, layout.tp_size, layout.tp_rank), what=f"logits of {s.name}")


def gather_hf(masks: MaskSet, dims: LlamaDims, layout: Layout,
              tensor_of: Callable[[NMMaskParametrization], torch.Tensor], dst: int = 0,
              ) -> Optional[dict[str, torch.Tensor]]:
    """Full HF-named tensors of ``tensor_of(mask)`` on global rank ``dst`` (None elsewhere); a collective.

    Gathered one layer at a time (only data-parallel replica 0 sends), so ``dst`` holds at most one
    layer's pieces besides the result.
    """
    rank = dist.get_rank()
    result: dict[str, torch.Tensor] = {}
    for layer in range(dims.layers):
        mine = []
        if layout.dp_rank == 0:
            of_layer = {n: s for n, s in masks.items() if s.layer == layer}
            mine = [Piece(p.hf_name, p.tensor.detach().cpu().clone(), p.dim, p.rank, p.parts)
                    for p in local_pieces(of_layer, dims, layout, tensor_of)]
        gathered: list = [None] * dist.get_world_size() if rank == dst else None
        dist.gather_object(mine, gathered, dst=dst)
        if rank == dst:
            result.update(assemble([p for pieces in gathered for p in pieces]))
    return result if rank == dst else None


def assemble(pieces: Sequence[Piece]) -> dict[str, torch.Tensor]:
    """Concatenate each HF name's pieces in rank order (every rank's piece must be present)."""
    by_name: dict[str, dict[int, Piece]] = {}
    for p in pieces:
        by_name.setdefault(p.hf_name, {})[p.rank] = p
    out = {}
    for name, parts in by_name.items():
        first = next(iter(parts.values()))
        if sorted(parts) != list(range(first.parts)):
            raise RuntimeError(f"{name}: pieces of TP ranks {sorted(parts)} gathered, expected 0..{first.parts - 1}")
        out[name] = torch.cat([parts[r].tensor for r in range(first.parts)], dim=first.dim)
    return out
