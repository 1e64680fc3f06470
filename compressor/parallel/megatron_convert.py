"""HF LLaMA-family state dicts <-> megatron-core GPTModel state dicts, per tensor/pipeline-parallel rank.

Written from megatron-core's layer structure (local spec, no Transformer Engine):

==========================================  =============================================  ============
megatron (per pipeline stage, local index)  HF (global layer index i = offset + local)     TP split
==========================================  =============================================  ============
embedding.word_embeddings.weight            model.embed_tokens.weight                      vocab rows
decoder.layers.j.input_layernorm.weight     model.layers.i.input_layernorm.weight          replicated
decoder.layers.j.self_attention.linear_qkv  model.layers.i.self_attn.{q,k,v}_proj          query groups
  (.weight, and .bias for qwen2)
decoder.layers.j.self_attention.linear_proj model.layers.i.self_attn.o_proj                input cols
decoder.layers.j.pre_mlp_layernorm.weight   model.layers.i.post_attention_layernorm.weight replicated
decoder.layers.j.mlp.linear_fc1             model.layers.i.mlp.{gate,up}_proj              gate, up rows
decoder.layers.j.mlp.linear_fc2             model.layers.i.mlp.down_proj                   input cols
decoder.final_layernorm.weight              model.norm.weight                              replicated
output_layer.weight                         lm_head.weight (embed_tokens when tied)        vocab rows
==========================================  =============================================  ============

Fused QKV (grouped-query attention): the rows are grouped by query group g (one KV head each):
``[q heads of g (heads/groups of them), k head g, v head g]`` for g = 0..groups-1, so a TP rank's
rows are a contiguous run of whole query groups. Fused fc1 of a TP rank is ``[its gate rows; its up
rows]`` (SwiGLU applies silu to the first half). RoPE needs no permutation: HF LLaMA and megatron
(``rotary_interleaved=False``) both rotate the two halves of each head. Qwen2 is LLaMA with biases on
q, k and v (none on o or the MLP): megatron's ``add_qkv_bias``, a fused QKV bias laid out like the rows.

The row/column maps only move whole rows or columns, so they apply unchanged to any tensor whose
dim 0 is a linear's output row and dim 1 its input column (or group of M columns): weights, masks,
mask logits (out, in/M, C) and their gradients. Every map is slicing and concatenation: exact.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Mapping

import torch

from compressor.errors import ConfigError, UnsupportedArchitectureError
from compressor.models.arch import ARCHITECTURES

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
Getter = Callable[[str], torch.Tensor]


# -- model dimensions -------------------------------------------------------------------------------
@dataclass(frozen=True)
class LlamaDims:
    """What the conversion and the megatron model need from an HF LLaMA-family config."""

    hidden: int
    heads: int
    kv_heads: int  # = megatron's num_query_groups
    head_dim: int
    ffn: int
    layers: int
    vocab: int
    tied: bool
    norm_eps: float
    rope_theta: float
    max_positions: int
    qkv_bias: bool = False  # Qwen2: q/k/v biases (megatron's add_qkv_bias)

    @property
    def q_per_group(self) -> int:
        return self.heads // self.kv_heads

    @property
    def qkv_rows(self) -> int:
        return (self.heads + 2 * self.kv_heads) * self.head_dim

    @classmethod
    def from_hf_config(cls, config) -> "LlamaDims":
        model_type = getattr(config, "model_type", None)
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedArchitectureError(
                f"megatron conversion supports model types {SUPPORTED_MODEL_TYPES}, got {model_type!r} "
                "(other biases, qk-norms or other layouts are not mapped; use the single-process or DeepSpeed backend)")
        for flag in ("attention_bias", "mlp_bias"):
            if getattr(config, flag, False):
                raise UnsupportedArchitectureError(f"the model has {flag}=True; the megatron conversion maps "
                                                   "bias-free LLaMA layers and Qwen2's q/k/v biases only")
        act = getattr(config, "hidden_act", "silu")
        if act != "silu":
            raise UnsupportedArchitectureError(f"hidden_act={act!r}: the megatron model is built with SwiGLU (silu)")
        if getattr(config, "sliding_window", None):
            raise UnsupportedArchitectureError("sliding-window attention is not mapped to megatron; "
                                               "set sliding_window to null if the model does not use it")
        rope = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", None):
            raise UnsupportedArchitectureError(f"RoPE scaling {rope_type!r} is not mapped to megatron "
                                               "(only plain RoPE)")
        theta = rope.get("rope_theta", getattr(config, "rope_theta", None))
        if theta is None:
            raise UnsupportedArchitectureError("the config gives no rope_theta")
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        if heads % kv_heads:
            raise UnsupportedArchitectureError(f"{heads} attention heads do not split into {kv_heads} KV heads")
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return cls(hidden=config.hidden_size, heads=heads, kv_heads=kv_heads, head_dim=head_dim,
                   ffn=config.intermediate_size, layers=config.num_hidden_layers, vocab=config.vocab_size,
                   tied=bool(getattr(config, "tie_word_embeddings", False)), norm_eps=float(config.rms_norm_eps),
                   rope_theta=float(theta), max_positions=int(config.max_position_embeddings),
                   qkv_bias=ARCHITECTURES[model_type].qkv_bias)


def check_parallel_sizes(dims: LlamaDims, tp: int, pp: int) -> None:
    """Raise a ConfigError naming the dimension that does not split over TP / PP."""
    problems = []
    for what, size in (("num_key_value_heads (query groups)", dims.kv_heads), ("intermediate_size", dims.ffn),
                       ("hidden_size", dims.hidden), ("vocab_size", dims.vocab)):
        if size % tp:
            problems.append(f"{what}={size} is not divisible by tensor_parallel={tp}")
    if dims.layers % pp:
        problems.append(f"num_hidden_layers={dims.layers} is not divisible by pipeline_parallel={pp}")
    if problems:
        raise ConfigError("the model does not split over this layout: " + "; ".join(problems)
                          + " (choose parallel sizes that divide them)")


# -- which rank holds what --------------------------------------------------------------------------
@dataclass(frozen=True)
class Shard:
    """One rank's place in the tensor x pipeline layout (data-parallel replicas hold the same shard)."""

    tp_size: int = 1
    tp_rank: int = 0
    pp_size: int = 1
    pp_rank: int = 0

    @property
    def pre_process(self) -> bool:  # holds the embedding
        return self.pp_rank == 0

    @property
    def post_process(self) -> bool:  # holds the final norm and output layer
        return self.pp_rank == self.pp_size - 1

    def layer_offset(self, dims: LlamaDims) -> int:
        return self.pp_rank * (dims.layers // self.pp_size)

    def layers(self, dims: LlamaDims) -> range:
        """Global (HF) indices of this stage's decoder layers."""
        per_stage = dims.layers // self.pp_size
        return range(self.pp_rank * per_stage, (self.pp_rank + 1) * per_stage)


# -- the masked linears -----------------------------------------------------------------------------
@dataclass(frozen=True)
class LinearKind:
    """A megatron linear of a decoder layer and the HF linears it holds."""

    path: str  # inside a megatron TransformerLayer
    hf: tuple[str, ...]  # inside an HF decoder layer
    split_dim: int  # TP split: 0 = rows (column-parallel), 1 = input columns (row-parallel)


LINEARS = (
    LinearKind("self_attention.linear_qkv", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), 0),
    LinearKind("self_attention.linear_proj", ("self_attn.o_proj",), 1),
    LinearKind("mlp.linear_fc1", ("mlp.gate_proj", "mlp.up_proj"), 0),
    LinearKind("mlp.linear_fc2", ("mlp.down_proj",), 1),
)


QKV = LINEARS[0]


def hf_layer(i: int) -> str:
    return f"model.layers.{i}"


def layer_tensors(dims: LlamaDims) -> list[tuple[LinearKind, str]]:
    """(linear, parameter) pairs of a decoder layer that the row/column maps move: every weight, and
    Qwen2's fused QKV bias (1-D, rows only: the same query-group map as the weight's rows)."""
    return [(kind, "weight") for kind in LINEARS] + ([(QKV, "bias")] if dims.qkv_bias else [])


def split_local(kind: LinearKind, local: torch.Tensor, dims: LlamaDims, tp: int) -> list[torch.Tensor]:
    """A rank's megatron tensor (rows first) -> its part of each HF tensor of ``kind.hf``, in that order."""
    if kind.path.endswith("linear_qkv"):
        groups = dims.kv_heads // tp
        per_group = local.reshape(groups, dims.q_per_group + 2, dims.head_dim, *local.shape[1:])
        q = per_group[:, : dims.q_per_group].reshape(groups * dims.q_per_group * dims.head_dim, *local.shape[1:])
        k = per_group[:, dims.q_per_group].reshape(groups * dims.head_dim, *local.shape[1:])
        v = per_group[:, dims.q_per_group + 1].reshape(groups * dims.head_dim, *local.shape[1:])
        return [q, k, v]
    if kind.path.endswith("linear_fc1"):
        gate, up = local.chunk(2, dim=0)
        return [gate, up]
    return [local]


def join_local(kind: LinearKind, parts: list[torch.Tensor], dims: LlamaDims, tp: int) -> torch.Tensor:
    """Inverse of ``split_local``: a rank's parts of the HF tensors -> its megatron tensor."""
    if kind.path.endswith("linear_qkv"):
        q, k, v = parts
        groups = dims.kv_heads // tp
        rest = q.shape[1:]
        q = q.reshape(groups, dims.q_per_group, dims.head_dim, *rest)
        k = k.reshape(groups, 1, dims.head_dim, *rest)
        v = v.reshape(groups, 1, dims.head_dim, *rest)
        return torch.cat([q, k, v], dim=1).reshape(-1, *rest)  # (groups * (q_per_group + 2) * head_dim, ...)
    if kind.path.endswith("linear_fc1"):
        return torch.cat(parts, dim=0)
    (only,) = parts
    return only


def shard_hf(kind: LinearKind, hf_tensors: list[torch.Tensor], dims: LlamaDims, tp: int, rank: int) -> torch.Tensor:
    """Full HF tensors of ``kind.hf`` -> the megatron tensor of TP rank ``rank`` (a copy)."""
    parts = [t.chunk(tp, dim=kind.split_dim)[rank] for t in hf_tensors]
    return join_local(kind, parts, dims, tp).clone()


def merge_to_hf(kind: LinearKind, per_rank: list[torch.Tensor], dims: LlamaDims) -> list[torch.Tensor]:
    """The megatron tensors of all TP ranks (in rank order) -> the full HF tensors of ``kind.hf``."""
    tp = len(per_rank)
    split = [split_local(kind, t, dims, tp) for t in per_rank]
    return [torch.cat([s[j] for s in split], dim=kind.split_dim) for j in range(len(kind.hf))]


# -- whole state dicts ------------------------------------------------------------------------------
_LAYER_NORMS = (("input_layernorm.weight", "input_layernorm.weight"),
                ("pre_mlp_layernorm.weight", "post_attention_layernorm.weight"))


def _hf_output_name(dims: LlamaDims) -> str:
    return "model.embed_tokens.weight" if dims.tied else "lm_head.weight"


def hf_to_megatron(get: Getter, dims: LlamaDims, shard: Shard) -> dict[str, torch.Tensor]:
    """The megatron state dict (local names, no ``_extra_state``) of one rank, read tensor by tensor.

    ``get(name)`` returns a full HF tensor (a state dict's ``__getitem__`` or a lazy WeightStore's ``get``).
    """
    tp, rank = shard.tp_size, shard.tp_rank
    out: dict[str, torch.Tensor] = {}
    if shard.pre_process:
        out["embedding.word_embeddings.weight"] = get("model.embed_tokens.weight").chunk(tp, 0)[rank].clone()
    for local, i in enumerate(shard.layers(dims)):
        src, dst = hf_layer(i), f"decoder.layers.{local}"
        for mg, hf in _LAYER_NORMS:
            out[f"{dst}.{mg}"] = get(f"{src}.{hf}").clone()
        for kind, param in layer_tensors(dims):
            full = [get(f"{src}.{h}.{param}") for h in kind.hf]
            out[f"{dst}.{kind.path}.{param}"] = shard_hf(kind, full, dims, tp, rank)
    if shard.post_process:
        out["decoder.final_layernorm.weight"] = get("model.norm.weight").clone()
        # Tied embeddings in one stage: megatron's output layer reuses the embedding (no tensor of its own).
        if not (dims.tied and shard.pre_process):
            out["output_layer.weight"] = get(_hf_output_name(dims)).chunk(tp, 0)[rank].clone()
    return out


def megatron_to_hf(shards: Mapping[tuple[int, int], Mapping[str, torch.Tensor]], dims: LlamaDims,
                   tp: int, pp: int) -> dict[str, torch.Tensor]:
    """Merge the state dicts of every (tp_rank, pp_rank) into one HF state dict."""
    missing = [(t, p) for t in range(tp) for p in range(pp) if (t, p) not in shards]
    if missing:
        raise ValueError(f"megatron_to_hf: no state dict for (tp_rank, pp_rank) {missing}")
    out: dict[str, torch.Tensor] = {}
    for p in range(pp):
        stage = [Shard(tp, t, pp, p) for t in range(tp)]
        sds = [shards[(t, p)] for t in range(tp)]
        first = stage[0]
        if first.pre_process:
            out["model.embed_tokens.weight"] = torch.cat([sd["embedding.word_embeddings.weight"] for sd in sds], 0)
        for local, i in enumerate(first.layers(dims)):
            src, dst = f"decoder.layers.{local}", hf_layer(i)
            for mg, hf in _LAYER_NORMS:
                out[f"{dst}.{hf}"] = sds[0][f"{src}.{mg}"].clone()
            for kind, param in layer_tensors(dims):
                merged = merge_to_hf(kind, [sd[f"{src}.{kind.path}.{param}"] for sd in sds], dims)
                for h, tensor in zip(kind.hf, merged):
                    out[f"{dst}.{h}.{param}"] = tensor
        if first.post_process:
            out["model.norm.weight"] = sds[0]["decoder.final_layernorm.weight"].clone()
            if not dims.tied:
                out["lm_head.weight"] = torch.cat([sd["output_layer.weight"] for sd in sds], 0)
    return out


def hf_names(dims: LlamaDims) -> list[str]:
    """Every HF tensor name the conversion reads or writes (tied models have no lm_head)."""
    names = ["model.embed_tokens.weight"]
    for i in range(dims.layers):
        names += [f"{hf_layer(i)}.{hf}" for _, hf in _LAYER_NORMS]
        names += [f"{hf_layer(i)}.{h}.{param}" for kind, param in layer_tensors(dims) for h in kind.hf]
    names.append("model.norm.weight")
    if not dims.tied:
        names.append("lm_head.weight")
    return names


def stage_hf_names(dims: LlamaDims, shard: Shard) -> Iterable[str]:
    """The HF tensors one rank reads (so a stage loads only its own layers)."""
    if shard.pre_process:
        yield "model.embed_tokens.weight"
    for i in shard.layers(dims):
        yield from (f"{hf_layer(i)}.{hf}" for _, hf in _LAYER_NORMS)
        yield from (f"{hf_layer(i)}.{h}.{param}" for kind, param in layer_tensors(dims) for h in kind.hf)
    if shard.post_process:
        yield "model.norm.weight"
        if not (dims.tied and shard.pre_process):
            yield _hf_output_name(dims)
