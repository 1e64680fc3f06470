"""Prove a distributed recipe on the meta device, rank by rank, without the hardware.

For each (tensor rank, pipeline rank) of a recipe (data-parallel replicas hold the same shard) this builds what
a training rank builds: its megatron-core ``GPTModel`` stage (``megatron_model.build_gpt_model``), the mask
logits on its Column/RowParallelLinear shards (``megatron_masks.attach_sharded_masks``) and the pieces its
checkpoint writes (``megatron_checkpoint.piece_layout``), with shapes and dtypes but no storage. Then:

(a) HF layout: every stage's TP shards, merged by the HF <-> GPTModel map (``megatron_convert``), give every
    tensor of the HF model (built from the same config on the meta device) with its exact shape, and the map's
    split of each HF tensor gives each rank's tensor (what ``load_hf_weights`` asserts). Each linear the map
    splits by rows is megatron's ColumnParallelLinear, each one it splits by input columns a RowParallelLinear.
    The checkpoint pieces of all ranks (logits and AdamW states, chunk r of TP along a dimension) join to
    (out, in / M, C(M, N)) for every masked HF weight, as a reader at any layout joins them.
(b) Every row-parallel shard's input width divides by M: a group of M must not straddle two ranks.
(c) The planner (``memory_plan``) predicts each rank's parameter, masked-weight and logit counts, the bytes of
    its weights and of its checkpoint, and its largest masked shard exactly.

How one process builds rank (t, p) of a TP x PP world it does not have: megatron-core 0.16 takes a model's
process groups from the ``ProcessGroupCollection`` handed to ``GPTModel``, and while building asks a group
only for ``size()`` and ``rank()`` (a linear's rows per rank, the vocab range, the layer offset). Each rank's
model gets stand-in groups (``_Group``) answering those two; megatron's global ``parallel_state`` is never
initialised and no collective runs (the tied-embedding all-reduce across stages is skipped with no ``embd``
group). megatron consults a group only when ``torch.distributed`` is initialised (otherwise it assumes size 1),
so the proof runs inside a one-rank world of torch's ``fake`` backend (no sockets, no store), made and torn down
here unless the caller has one. Weights land on the meta device through ``torch.device("meta")`` (our megatron
config sets ``use_cpu_initialization``, so megatron's ``torch.empty`` calls name no device), masks where their
weight is. The one real allocation is RoPE's ``inv_freq`` (head_dim / 2 floats that megatron puts on the CPU
by name; an attribute, not a buffer). Every parameter and buffer is checked to be meta, and the process's
resident memory to stay small.

    python -m compressor.parallel.memory_plan --config configs/distributed/nemotron4_15b_tp8_pp2.yaml \\
        --preset nemotron4-15b-class --prove
"""

from __future__ import annotations

import math
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Optional, Sequence

import torch
import torch.distributed as dist

from compressor.errors import CompressorError, SparsityPatternError
from compressor.parallel.memory_plan import (
    DTYPE_BYTES, ModelDims, Setup, StageMemory, dims_for_source, dims_from_hf_config, plan_memory,
    setup_from_config,
)
from compressor.sparsity import NM

if TYPE_CHECKING:
    from compressor.parallel.config import DistributedLearnConfig
    from compressor.parallel.megatron_convert import LlamaDims
    from compressor.parallel.megatron_model import Layout

RSS_LIMIT = 512 * 2**20  # a real shard of the 7B / 15B recipes is gigabytes; Python objects are megabytes
Shape = tuple[int, ...]


class MetaProofError(CompressorError):
    """The recipe's model does not shard as its layout or its plan says (the message lists each difference)."""


@dataclass(frozen=True)
class RankShard:
    """What one (tensor rank, pipeline rank) holds, as megatron builds it."""

    tp_rank: int
    pp_rank: int
    layers: range  # global (HF) decoder layers of the stage
    params: int  # frozen weights: linear shards, Qwen2 biases, norms, embedding / output-layer shards
    masked_weights: int
    logits: int
    weight_bytes: dict[str, int]  # the GPTModel stage's parameters, by dtype
    checkpoint_bytes: dict[str, int]  # the pieces a distributed checkpoint writes (logits, AdamW states), by dtype
    checkpoint_pieces: int
    largest_weight: tuple[str, Shape]  # local megatron name, shape
    largest_masked: tuple[str, Shape, Shape]  # local megatron name, weight shape, logits shape

    def figures(self) -> tuple:
        """Everything but the ranks: equal figures print as one row."""
        return (self.layers, self.params, self.masked_weights, self.logits, self.weight_bytes, self.checkpoint_bytes,
                self.checkpoint_pieces, self.largest_weight, self.largest_masked)


@dataclass(frozen=True)
class MetaProof:
    model: str  # the model's dimensions, one line
    tp: int
    pp: int
    nm: NM
    ranks: tuple[RankShard, ...]
    stages: tuple[StageMemory, ...]  # the planner's, which matched every rank
    hf_tensors: int  # HF tensors reassembled from the shards
    masked_hf_weights: int  # HF weights whose logits reassembled
    rss_growth: int  # bytes: the most the process's resident memory grew while a shard was alive

    def table(self) -> str:
        """One row per run of TP ranks of a stage with equal figures."""
        head = ("tp ranks", "pp", "layers", "parameters", "masked", "logits", "weights GiB", "checkpoint GiB",
                "pieces", "largest masked shard -> logits")
        rows = [head]
        for group in _runs(self.ranks):
            r = group[0]
            name, w, lg = r.largest_masked
            first, last = group[0].tp_rank, group[-1].tp_rank
            rows.append((f"{first}-{last}" if last > first else str(first), str(r.pp_rank),
                         f"{r.layers.start}-{r.layers.stop - 1}", f"{r.params:,}", f"{r.masked_weights:,}",
                         f"{r.logits:,}", _gib(r.weight_bytes), _gib(r.checkpoint_bytes), str(r.checkpoint_pieces),
                         f"{name.split('.', 3)[-1]} {_dims(w)} -> {_dims(lg)}"))
        widths = [max(len(row[c]) for row in rows) for c in range(len(head))]
        lines = [self.model, f"layout: TP={self.tp} x PP={self.pp} ({self.tp * self.pp} model ranks; data-parallel "
                             f"replicas hold the same shards), {self.nm}, every tensor on the meta device", ""]
        lines += ["  ".join(v.rjust(w) if c > 2 else v.ljust(w) for c, (v, w) in enumerate(zip(row, widths))).rstrip()
                  for row in rows]
        lines += ["", f"HF layout: {self.hf_tensors} HF tensors reassembled exactly from the TP shards (column-parallel "
                      f"by rows, row-parallel by columns, fused QKV by query groups); checkpoint pieces (logits, "
                      f"AdamW states) of {self.masked_hf_weights} masked weights joined as (out, in/{self.nm.m}, "
                      f"{math.comb(self.nm.m, self.nm.n)})",
                  f"row-parallel shard widths: all multiples of M={self.nm.m}",
                  "planner (memory_plan): parameters, masked weights, logits, weight and checkpoint bytes and the "
                  "largest masked shard equal on every rank",
                  f"process memory: no storage allocated (every parameter and buffer on meta), resident memory grew "
                  f"{self.rss_growth / 2**20:.0f} MiB at most"]
        return "\n".join(lines)


# -- entry points ---------------------------------------------------------------------------------------
def prove_config(cfg: "DistributedLearnConfig", preset: Optional[str] = None, rss_limit: int = RSS_LIMIT) -> MetaProof:
    """Prove a ``configs/distributed`` recipe (``preset``: the model's dimensions when its folder is elsewhere)."""
    setup = setup_from_config(cfg)
    return prove(recipe_hf_config(cfg.model.source, preset, cfg.train.seq_len), setup, cfg.megatron_dtype,
                 cfg.maskllm.logits_dtype, cfg.targets, cfg.ignore, rss_limit)


def recipe_hf_config(source: str, preset: Optional[str] = None, max_positions: int = 4096) -> Any:
    """The HF config of a local model folder, else of a preset's dimensions (``memory_plan.PRESETS``)."""
    folder = Path(source).expanduser()
    if preset is None and (folder / "config.json").is_file():
        from compressor.models.loading import load_hf_config

        return load_hf_config(folder)
    return hf_config_of(dims_for_source(source, preset), max_positions)


def hf_config_of(dims: ModelDims, max_positions: int = 4096) -> Any:
    """An HF LLaMA (Qwen2 with q/k/v biases) config of these dimensions."""
    from transformers import AutoConfig

    return AutoConfig.for_model(
        "qwen2" if dims.qkv_bias else "llama", hidden_size=dims.hidden, intermediate_size=dims.intermediate,
        num_hidden_layers=dims.layers, num_attention_heads=dims.heads, num_key_value_heads=dims.kv_heads,
        vocab_size=dims.vocab, tie_word_embeddings=dims.tied_embeddings, max_position_embeddings=max_positions)


def prove(hf_config: Any, setup: Setup, weight_dtype: str = "bfloat16", logits_dtype: str = "float32",
          targets: Sequence[str] = (".*",), ignore: Sequence[str] = (), rss_limit: int = RSS_LIMIT) -> MetaProof:
    """Build every (TP, PP) rank of ``setup`` for ``hf_config`` on the meta device and check (a), (b), (c)."""
    from compressor.methods.maskllm.config import MaskLLMConfig
    from compressor.parallel.megatron_convert import LlamaDims, check_parallel_sizes

    dims = LlamaDims.from_hf_config(hf_config)
    nm = NM(setup.n, setup.m)
    for what, name, size in (("weight", weight_dtype, setup.weight_bytes), ("logit", logits_dtype, setup.logits_bytes)):
        if DTYPE_BYTES[name] != size:
            raise MetaProofError(f"the plan counts {size} B per {what}, the model holds its {what}s in {name}")
    check_parallel_sizes(dims, setup.tensor, setup.pipeline)
    mask_cfg = MaskLLMConfig(sparsity=nm, logits_dtype=logits_dtype)
    hf_shapes = _hf_shapes(hf_config)
    import megatron.core.models.gpt.gpt_layer_specs  # noqa: F401  imported before the memory baseline
    ranks, shards, pieces, growth = [], {}, {}, 0
    with _one_rank_world():
        baseline = _rss()
        for layout in _layouts(setup.tensor, setup.pipeline):
            rank, state, checkpoint, rss = _build_rank(dims, layout, nm, weight_dtype, mask_cfg, targets, ignore)
            growth = max(growth, rss - baseline)
            ranks.append(rank)
            shards[(layout.tp_rank, layout.pp_rank)] = state
            for name, (shape, _, spec) in checkpoint.items():
                pieces.setdefault(name, []).append((tuple(shape), spec))
    if growth > rss_limit:
        raise MetaProofError(f"resident memory grew by {growth / 2**20:.0f} MiB while building the shards (limit "
                             f"{rss_limit / 2**20:.0f} MiB): something allocated real storage")
    hf_tensors, masked = _check_hf_layout(shards, pieces, dims, hf_shapes, setup.tensor, setup.pipeline, nm,
                                          targets, ignore)
    plan_dims = dims_from_hf_config(hf_config.to_dict())
    try:
        stages = plan_memory(plan_dims, setup)
    except ValueError as e:
        raise MetaProofError(f"megatron builds this layout but the planner refuses it: {e}") from e
    check_plan(ranks, stages)
    return MetaProof(_describe(plan_dims), setup.tensor, setup.pipeline, nm, tuple(ranks), tuple(stages), hf_tensors,
                     masked, growth)


# -- building one rank ----------------------------------------------------------------------------------
class _Group:
    """Stands in for a process group while megatron builds a model: it asks only for size and rank."""

    def __init__(self, size: int, rank: int) -> None:
        self._size, self._rank = size, rank

    def size(self) -> int:
        return self._size

    def rank(self) -> int:
        return self._rank


def _groups(layout: "Layout") -> Any:
    from megatron.core.process_groups_config import ProcessGroupCollection

    return ProcessGroupCollection(tp=_Group(layout.tp_size, layout.tp_rank), pp=_Group(layout.pp_size, layout.pp_rank),
                                  cp=_Group(1, 0), embd=None)


@contextmanager
def _one_rank_world() -> Iterator[None]:
    """A one-rank ``fake`` world (megatron reads group sizes only once torch.distributed is initialised)."""
    if dist.is_initialized():
        yield
        return
    dist.init_process_group("fake", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _layouts(tp: int, pp: int) -> Iterator["Layout"]:
    from compressor.parallel.megatron_model import Layout

    for p in range(pp):
        for t in range(tp):
            yield Layout(tp_size=tp, tp_rank=t, pp_size=pp, pp_rank=p, dp_size=1, dp_rank=0)


def _build_rank(dims: "LlamaDims", layout: "Layout", nm: NM, weight_dtype: str, mask_cfg: Any,
                targets: Sequence[str], ignore: Sequence[str]) -> tuple[RankShard, dict[str, torch.Tensor], dict, int]:
    """The rank's figures, its megatron state dict (meta tensors), its checkpoint pieces and the process RSS
    while it lives."""
    from compressor.parallel.megatron_checkpoint import piece_layout
    from compressor.parallel.megatron_masks import attach_sharded_masks
    from compressor.parallel.megatron_model import build_gpt_model, megatron_state_dict
    from compressor.precision import DTYPES

    with torch.device("meta"):
        model = build_gpt_model(dims, layout, DTYPES[weight_dtype], pg_collection=_groups(layout))
    check_parallel_linears(model, dims, layout, nm)
    state = megatron_state_dict(model)  # local megatron names, before the masks rename the weights they wrap
    params = list(model.parameters())
    weight_bytes = _bytes_by_dtype(params)
    model.train(False)  # registering a mask runs it once: the hard mask's argmax works on meta, autocast's check not
    masks = attach_sharded_masks(model, dims, layout, mask_cfg, targets=targets, ignore=ignore)
    real = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if not t.is_meta]
    if real:
        raise MetaProofError(f"{layout.describe()}: {len(real)} tensors hold real storage, e.g. {real[:3]}")
    largest = max(state.items(), key=lambda kv: kv[1].numel())
    top = max(masks.values(), key=lambda s: s.mask.logits.numel())
    ckpt = piece_layout(masks, dims, layout)
    rank = RankShard(
        tp_rank=layout.tp_rank, pp_rank=layout.pp_rank, layers=layout.shard.layers(dims),
        params=sum(p.numel() for p in params),
        masked_weights=sum(math.prod(s.mask.shape) for s in masks.values()),
        logits=sum(s.mask.logits.numel() for s in masks.values()),
        weight_bytes=weight_bytes,
        checkpoint_bytes=_sum_by_dtype((math.prod(shape), dtype) for shape, dtype, _ in ckpt.values()),
        checkpoint_pieces=len(ckpt),
        largest_weight=(largest[0], tuple(largest[1].shape)),
        largest_masked=(top.name, tuple(top.mask.shape), tuple(top.mask.logits.shape)),
    )
    return rank, state, ckpt, _rss()  # measured while the model is alive: a freed real tensor would not show


def check_parallel_linears(model: torch.nn.Module, dims: "LlamaDims", layout: "Layout", nm: NM) -> None:
    """Each decoder linear is the megatron class the conversion's split assumes, and every row-parallel
    shard's input width divides by M (raises naming the layer and the tensor-parallel sizes that work)."""
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    from compressor.parallel.megatron_convert import LINEARS, hf_layer

    for layer in model.decoder.layers:
        i = layer.layer_number - 1  # megatron numbers layers from 1, globally
        for kind in LINEARS:
            module = layer.get_submodule(kind.path)
            want = RowParallelLinear if kind.split_dim == 1 else ColumnParallelLinear
            if not isinstance(module, want):
                raise MetaProofError(f"decoder.layers.{i}.{kind.path} is a {type(module).__name__}; the HF mapping "
                                     f"splits it by {'input columns' if kind.split_dim else 'rows'} ({want.__name__})")
            width = module.weight.shape[1]
            if kind.split_dim == 1 and width % nm.m:
                hf = ", ".join(f"{hf_layer(i)}.{h}" for h in kind.hf)
                raise SparsityPatternError(
                    f"decoder.layers.{i}.{kind.path} ({hf}) on {layout.describe()}: its row-parallel shard has "
                    f"{width} input columns ({width * layout.tp_size} over tensor_parallel={layout.tp_size}), not a "
                    f"multiple of M={nm.m}, so groups of {nm.m} would straddle two ranks; use tensor_parallel "
                    f"{' or '.join(map(str, working_tp(dims, nm)))}")


def working_tp(dims: "LlamaDims", nm: NM) -> list[int]:
    """Tensor-parallel sizes the model splits over with whole N:M groups in every row-parallel shard."""
    splits = (dims.kv_heads, dims.heads, dims.ffn, dims.hidden, dims.vocab)
    row_widths = (dims.heads * dims.head_dim, dims.ffn)
    return [t for t in range(1, dims.kv_heads + 1)
            if all(s % t == 0 for s in splits) and all((w // t) % nm.m == 0 for w in row_widths)]


# -- the checks -----------------------------------------------------------------------------------------
def _check_hf_layout(shards: Mapping[tuple[int, int], Mapping[str, torch.Tensor]],
                     pieces: Mapping[str, list[tuple[Shape, Any]]], dims: "LlamaDims", hf_shapes: Mapping[str, Shape],
                     tp: int, pp: int, nm: NM, targets: Sequence[str], ignore: Sequence[str]) -> tuple[int, int]:
    """(a): the shards against the HF model, both ways; the checkpoint's pieces (logits, AdamW states) of every
    rank, joined as a reader at any layout joins them, against its masked weights."""
    from compressor.parallel.megatron_checkpoint import EXP_AVG, EXP_AVG_SQ, LOGITS
    from compressor.parallel.megatron_convert import Shard, hf_layer, hf_to_megatron, megatron_to_hf
    from compressor.parallel.megatron_masks import select_linears

    expected = {k: s for k, s in hf_shapes.items() if not (dims.tied and k == "lm_head.weight")}
    try:
        merged = megatron_to_hf(shards, dims, tp, pp)
    except (KeyError, RuntimeError) as e:  # a missing tensor, or shards that do not concatenate
        raise MetaProofError(f"the TP x PP shards do not merge into the HF tensors: {e}") from e
    problems = _differences("HF tensor from the shards", _shapes(merged), expected)
    hf = {k: torch.empty(s, device="meta") for k, s in hf_shapes.items()}
    for (t, p), state in shards.items():
        split = hf_to_megatron(hf.__getitem__, dims, Shard(tp, t, pp, p))
        problems += _differences(f"tp {t} pp {p}: megatron tensor from the HF split", _shapes(state), _shapes(split))
    patterns = math.comb(nm.m, nm.n)
    wanted = [f"{hf_layer(i)}.{h}.weight" for i, kind in select_linears(dims, range(dims.layers), targets, ignore)
              for h in kind.hf]
    joined, broken = _joined(pieces)
    problems += broken + _differences("checkpoint", joined, {
        prefix + n: (expected[n][0], expected[n][1] // nm.m, patterns) for n in wanted
        for prefix in (LOGITS, EXP_AVG, EXP_AVG_SQ)})
    _raise(problems, "the shards do not match the HF layout")
    return len(merged), len(wanted)


def _joined(pieces: Mapping[str, list[tuple[Shape, Any]]]) -> tuple[dict[str, Shape], list[str]]:
    """Each checkpoint tensor's shape from its pieces: chunk r of ``parts`` along ``dim``, every r present."""
    shapes, problems = {}, []
    for name, parts in pieces.items():
        by_rank = {spec.rank: (shape, spec) for shape, spec in parts}
        _, first = parts[0]
        if sorted(by_rank) != list(range(first.parts)) or len(parts) != first.parts:
            problems.append(f"checkpoint: {name} has pieces of TP ranks {sorted(by_rank)} of {first.parts}")
            continue
        rest = {s[:first.dim] + s[first.dim + 1:] for s, _ in parts}
        if len(rest) > 1:
            problems.append(f"checkpoint: {name}'s pieces {[s for s, _ in parts]} do not join along dim {first.dim}")
            continue
        shape = list(parts[0][0])
        shape[first.dim] = sum(s[first.dim] for s, _ in parts)
        shapes[name] = tuple(shape)
    return shapes, problems


def check_plan(ranks: Sequence[RankShard], stages: Sequence[StageMemory]) -> None:
    """(c): the planner's figures for each rank's stage against the meta model's."""
    problems = []
    for r in ranks:
        st = stages[r.pp_rank]
        pairs = (("parameters", st.param_count, r.params), ("masked weights", st.masked_weights, r.masked_weights),
                 ("logits", st.logit_count, r.logits), ("weight bytes", st.parameters, sum(r.weight_bytes.values())),
                 ("checkpoint bytes (logits + AdamW states)", st.logits + st.optimizer_states,
                  sum(r.checkpoint_bytes.values())),
                 ("largest masked shard", st.largest_masked, math.prod(r.largest_masked[1])))
        problems += [f"tp {r.tp_rank} pp {r.pp_rank}: {what}: planner {planned:,}, meta model {meta:,}"
                     for what, planned, meta in pairs if planned != meta]
    _raise(problems, "the planner's counts differ from the model's")


def _differences(what: str, got: Mapping[str, Shape], want: Mapping[str, Shape]) -> list[str]:
    out = [f"{what}: {n} missing" for n in sorted(set(want) - set(got))]
    out += [f"{what}: {n} unexpected" for n in sorted(set(got) - set(want))]
    out += [f"{what}: {n} has shape {got[n]}, expected {want[n]}" for n in sorted(set(got) & set(want)) if got[n] != want[n]]
    return out


def _raise(problems: list[str], headline: str, limit: int = 12) -> None:
    if problems:
        more = f"\n  ... and {len(problems) - limit} more" if len(problems) > limit else ""
        raise MetaProofError(f"{headline} ({len(problems)}):\n  " + "\n  ".join(problems[:limit]) + more)


# -- small helpers --------------------------------------------------------------------------------------
def _hf_shapes(hf_config: Any) -> dict[str, Shape]:
    from compressor.models.loading import meta_model_from_config

    return _shapes(meta_model_from_config(hf_config).state_dict())


def _shapes(tensors: Mapping[str, torch.Tensor]) -> dict[str, Shape]:
    return {k: tuple(v.shape) for k, v in tensors.items()}


def _bytes_by_dtype(tensors: Sequence[torch.Tensor]) -> dict[str, int]:
    return _sum_by_dtype((t.numel(), t.dtype) for t in tensors)


def _sum_by_dtype(items) -> dict[str, int]:
    from compressor.precision import dtype_name

    out: dict[str, int] = {}
    for numel, dtype in items:
        out[dtype_name(dtype)] = out.get(dtype_name(dtype), 0) + numel * dtype.itemsize
    return out


def _rss() -> int:
    """Resident bytes of this process now (0 where /proc is missing: the is_meta checks still hold)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0


def _runs(ranks: Sequence[RankShard]) -> list[list[RankShard]]:
    groups: list[list[RankShard]] = []
    for r in ranks:
        if groups and groups[-1][-1].pp_rank == r.pp_rank and groups[-1][-1].figures() == r.figures():
            groups[-1].append(r)
        else:
            groups.append([r])
    return groups


def _gib(by_dtype: Mapping[str, int]) -> str:
    return " + ".join(f"{n / 2**30:.3f} {k}" for k, n in sorted(by_dtype.items()))


def _dims(shape: Shape) -> str:
    return "x".join(map(str, shape))


def _describe(d: ModelDims) -> str:
    return (f"model: hidden {d.hidden}, intermediate {d.intermediate}, {d.layers} layers, {d.heads} heads / "
            f"{d.kv_heads} KV, vocab {d.vocab}{', tied' if d.tied_embeddings else ''}"
            f"{', q/k/v biases' if d.qkv_bias else ''}: {d.total_params():,} parameters")
