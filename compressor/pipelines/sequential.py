"""The sequential one-shot pipeline: decoder blocks in order, each calibrated on the outputs of the
already-pruned blocks before it (as SparseGPT and Wanda do), its linears solved in parallel as jobs.

Two activation streams flow through the blocks:
- the *pruned* stream feeds the method: block k's statistics come from inputs that went through the
  pruned blocks 0..k-1 (calibration pass with hooks), and after solving, the pruned block is run once
  more to produce block k+1's inputs (propagation pass);
- the *dense* stream (only when layer errors are reported) carries the dense model's activations, so
  that each layer's error is measured against the inputs it sees in the dense model (BENCHMARK.md).
Its time is booked as "error", apart from the pruning time ("calibrate" + "solve").
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch import nn
from tqdm.auto import tqdm

from compressor.calibration import BlockInputs, capture_block_inputs, collect_block_stats, run_block
from compressor.calibration.stats import InputStats
from compressor.execution.base import Executor
from compressor.execution.schedule import After, Job, run_jobs
from compressor.methods.objective import reconstruction_error
from compressor.methods.registry import (
    STATS_NEEDED,
    LayerJob,
    LayerResult,
    SparseGPTOptions,
    has_shared_factor,
    merge_row_chunks,
    row_separable,
    shared_factor,
    solve_layer,
)
from compressor.models.arch import DecoderArch
from compressor.models.layers import LinearTarget, by_block, decoder_blocks, prunable_linears
from compressor.pipelines.block_store import BlockStore
from compressor.sparsity import NM, SparsityTarget, assert_nm
from compressor.utils.logging import get_logger
from compressor.utils.timing import PhaseTimer

log = get_logger(__name__)


@dataclass
class OneShotPlan:
    method: str
    sparsity: SparsityTarget
    options: Any
    sparsegpt: Optional[SparseGPTOptions] = None
    targets: tuple[str, ...] = (".*",)
    ignore: tuple[str, ...] = ()
    batch_size: int = 8
    layer_error: bool = True


@dataclass
class LayerReport:
    name: str
    block: int
    type: str
    shape: tuple[int, int]
    density: float
    seconds: float
    error: Optional[float] = None  # vs. the dense model's inputs
    warm_start_error: Optional[float] = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class OneShotOutcome:
    masks: dict[str, torch.Tensor]  # weight name -> bool mask
    layers: list[LayerReport]
    timer: PhaseTimer
    resumed_blocks: int = 0


def _weight_name(t: LinearTarget) -> str:
    return f"{t.name}.weight"


def row_chunks(costs: dict[str, tuple[int, float]], workers: int) -> dict[str, list[tuple[int, int]]]:
    """Row ranges per layer, so that no job is much longer than the rest: a layer whose cost (name ->
    (rows, cost)) exceeds a 2 * ``workers``-th of the block's is split into equal row slices. With one
    worker nothing is split (splitting only adds overhead)."""
    limit = sum(c for _, c in costs.values()) / (2 * workers) if workers > 1 else float("inf")
    out = {}
    for name, (rows, cost) in costs.items():
        parts = max(1, min(rows, math.ceil(cost / limit))) if cost > limit else 1
        bounds = [round(i * rows / parts) for i in range(parts + 1)]
        out[name] = list(zip(bounds[:-1], bounds[1:]))
    return out


def _solve_block(
    block: nn.Module, targets: list[LinearTarget], stats: dict[str, InputStats], plan: OneShotPlan, executor: Executor
) -> list[LayerResult]:
    """All linears of a block as jobs: the factor each statistics group shares, and every layer, big
    layers split into row slices where the method allows it; run critical path first (``run_jobs``),
    so that the layers waiting for the widest input's factor are not left for last."""
    jobs = {t.name: LayerJob(_weight_name(t), plan.method, plan.sparsity, plan.options, plan.sparsegpt) for t in targets}
    groups = {t.group: t for t in targets}
    stat_handles = {g: executor.put(stats.get(g, InputStats("none", t.in_features))) for g, t in groups.items()}
    # Costs in one unit: a Gram-based solve ~ rows * cols^2 (the column sweep's updates, the others are
    # cheap); a factor (Cholesky and a triangular inverse) ~ cols^3 / 3, as measured per unit.
    costs = {t.name: (t.out_features, t.out_features * t.in_features ** 2) for t in targets}
    work = [Job(("factor", g), shared_factor, (jobs[t.name], stat_handles[g]), t.in_features ** 3 / 3)
            for g, t in groups.items() if has_shared_factor(jobs[t.name])]
    factors = {j.key[1] for j in work}
    separable = STATS_NEEDED[plan.method] == "gram" and all(row_separable(j) for j in jobs.values())
    chunks = row_chunks(costs, executor.parallelism if separable else 1)
    slices = [(t, r0, r1) for t in targets for r0, r1 in chunks[t.name]]
    for t, r0, r1 in slices:
        weight = block.get_submodule(t.rel).weight.detach()[r0:r1]
        factor = After(("factor", t.group)) if t.group in factors else None
        work.append(Job((t.name, r0), solve_layer, (jobs[t.name], weight, stat_handles[t.group], factor),
                        costs[t.name][1] * (r1 - r0) / t.out_features))
    handles = run_jobs(executor, work)
    parts: dict[str, list[LayerResult]] = {t.name: [] for t in targets}
    for (t, _, _), result in zip(slices, executor.gather([handles[(t.name, r0)] for t, r0, _ in slices])):
        parts[t.name].append(result)  # slices are in row order
    return [merge_row_chunks(parts[t.name]) for t in targets]


def _apply(block: nn.Module, t: LinearTarget, r: LayerResult) -> None:
    w = block.get_submodule(t.rel).weight
    new = r.weight if r.weight is not None else w.detach() * r.mask
    w.data.copy_((new * r.mask).to(w.dtype))  # multiply again: a method must never leak a pruned weight


def prune_sequential(
    model: nn.Module,
    arch: DecoderArch,
    windows: torch.Tensor,
    plan: OneShotPlan,
    executor: Executor,
    store: BlockStore = BlockStore(None),
    timer: Optional[PhaseTimer] = None,
    on_block_done: Optional[Callable[[int], None]] = None,
    on_block_start: Optional[Callable[[int], None]] = None,
) -> OneShotOutcome:
    """Prune every target linear of ``model`` block by block (see the module docstring).

    ``on_block_start`` / ``on_block_done`` let a caller load a block's weights just in time and write
    and release them afterwards, so a model larger than memory can be walked.
    """
    timer = timer or PhaseTimer()
    targets = prunable_linears(model, arch, plan.targets, plan.ignore)
    if not targets:
        raise ValueError(f"no linear layer matches targets={list(plan.targets)} ignore={list(plan.ignore)}")
    per_block = by_block(targets)
    needs = STATS_NEEDED[plan.method]
    blocks = decoder_blocks(model, arch)

    pruned_in: Optional[BlockInputs] = None
    dense_in: Optional[BlockInputs] = None
    if needs != "none" or plan.layer_error:
        with timer.phase("calibrate"):
            captured = capture_block_inputs(model, arch, windows, plan.batch_size)
        pruned_in = captured if needs != "none" else None
        dense_in = (captured.clone() if pruned_in is not None else captured) if plan.layer_error else None

    masks: dict[str, torch.Tensor] = {}
    reports: list[LayerReport] = []
    resumed = 0
    for k in tqdm(range(len(blocks)), desc=f"{plan.method} {plan.sparsity}", unit="block"):
        if on_block_start is not None:
            on_block_start(k)
        block, block_targets = blocks[k], per_block.get(k, [])
        groups = [g for g in arch.input_groups if any(t.group == g.name for t in block_targets)]
        dense_stats: dict[str, InputStats] = {}
        if dense_in is not None:
            with timer.phase("error"):
                dense_stats, dense_in = collect_block_stats(block, dense_in, groups, "gram", f"{arch.blocks}.{k}")
        if block_targets and store.has(k):
            results = store.load(k)
            resumed += 1
        elif block_targets:
            stats: dict[str, InputStats] = {}
            if pruned_in is not None:
                with timer.phase("calibrate"):
                    stats, _ = collect_block_stats(block, pruned_in, groups, needs, f"{arch.blocks}.{k}")
            with timer.phase("solve"):
                results = _solve_block(block, block_targets, stats, plan, executor)
            with timer.phase("checkpoint"):
                store.save(k, results)
        else:
            results = []
        with timer.phase("error"):
            reports += _report_block(block, block_targets, results, dense_stats)
        for t, r in zip(block_targets, results):
            _apply(block, t, r)
            masks[r.name] = r.mask
        if pruned_in is not None:
            with timer.phase("calibrate"):
                pruned_in = run_block(block, pruned_in)
        if isinstance(plan.sparsity, NM):
            for t in block_targets:
                assert_nm(block.get_submodule(t.rel).weight, plan.sparsity, t.name)
        if on_block_done is not None:
            on_block_done(k)
    return OneShotOutcome(masks, reports, timer, resumed)


def _report_block(
    block: nn.Module, targets: list[LinearTarget], results: list[LayerResult], dense_stats: dict[str, InputStats]
) -> list[LayerReport]:
    """Per-layer report; called before the results are applied, while the block holds dense weights."""
    out = []
    for t, r in zip(targets, results):
        w = block.get_submodule(t.rel).weight.detach()
        pruned = (r.weight if r.weight is not None else w) * r.mask
        rep = LayerReport(t.name, t.block, t.layer_type, (t.out_features, t.in_features),
                          float(r.mask.float().mean()), round(r.seconds, 4), extra=r.extra)
        gram = dense_stats[t.group].gram if t.group in dense_stats else None
        if gram is not None:
            rep.error = reconstruction_error(w, pruned, gram)
            if r.warm_start_mask is not None:
                rep.warm_start_error = reconstruction_error(w, w * r.warm_start_mask, gram)
        out.append(rep)
    return out
