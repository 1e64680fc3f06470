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
from typing import Any, Callable, Mapping, Optional

import torch
from torch import nn
from tqdm.auto import tqdm

from compressor.calibration import BlockInputs, capture_block_inputs, collect_block_stats, run_block
from compressor.calibration.stats import InputStats
from compressor.execution.base import Executor
from compressor.execution.schedule import After, Job, run_jobs
from compressor.methods.objective import reconstruction_error
from compressor.methods.oneshot import factor_cost, sweep_cost
from compressor.methods.registry import (
    LayerJob,
    LayerResult,
    SparseGPTOptions,
    get_method,
    has_shared_factor,
    merge_row_chunks,
    row_separable,
    shared_factor,
    solve_layers,
)
from compressor.models.arch import DecoderArch
from compressor.models.layers import LinearTarget, by_block, decoder_blocks, prunable_linears
from compressor.pipelines.block_store import BlockStore
from compressor.precision import Precision
from compressor.sparsity import NM, PackedMasks, SparsityTarget, assert_nm
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
    precision: Precision = Precision()  # of the pruned stream's passes (the dense stream measures: float32)
    # a mixed plan: each linear's own level by name ("model.layers.0.mlp.down_proj"); None = ``sparsity``
    levels: Optional[Mapping[str, SparsityTarget]] = None

    def level_for(self, name: str) -> SparsityTarget:
        if self.levels is None:
            return self.sparsity
        if name not in self.levels:
            raise KeyError(f"the sparsity plan has no level for {name}")
        return self.levels[name]

    def describe(self) -> str:
        return f"{self.method} {self.sparsity if self.levels is None else 'mixed'}"


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
    masks: Mapping[str, torch.Tensor]  # weight name -> bool mask (held packed, unpacked on access)
    layers: list[LayerReport]
    timer: PhaseTimer
    resumed_blocks: int = 0


def _weight_name(t: LinearTarget) -> str:
    return f"{t.name}.weight"


def plan_slices(groups: dict[str, tuple[int, int, bool]], workers: int) -> dict[str, int]:
    """Row slices per statistics group (name -> (rows of all its layers, cols, has a shared factor)).

    Starts from one job per group and keeps splitting the group with the longest chain (its factor,
    then its largest slice) while that lowers the larger of the two bounds on the block's time: total
    work / ``workers`` and the longest chain. Every slice pays the sweep's per-column cost again, so a
    split must buy more than it costs; with one worker nothing is split."""
    parts = {g: 1 for g in groups}

    def chain(g: str) -> float:
        rows, cols, shared = groups[g]
        return (factor_cost(cols) if shared else 0.0) + sweep_cost(math.ceil(rows / parts[g]), cols)

    def bound() -> float:
        total = sum((factor_cost(c) if f else 0.0) + parts[g] * sweep_cost(r / parts[g], c)
                    for g, (r, c, f) in groups.items())
        return max(total / workers, max(chain(g) for g in groups))

    best = bound()
    while True:
        g = max(parts, key=chain)
        if parts[g] >= groups[g][0]:
            return parts
        parts[g] += 1
        tried = bound()
        if tried >= best:
            parts[g] -= 1
            return parts
        best = tried


def row_runs(sizes: list[int], parts: int) -> list[list[tuple[int, int, int]]]:
    """Layers of ``sizes`` rows, laid one after another, cut into ``parts`` runs of (nearly) equal
    rows: for each run, its pieces (layer index, first row, end row)."""
    total, runs = sum(sizes), []
    for i in range(parts):
        lo, hi, offset, run = round(i * total / parts), round((i + 1) * total / parts), 0, []
        for k, n in enumerate(sizes):
            if max(lo, offset) < min(hi, offset + n):
                run.append((k, max(lo, offset) - offset, min(hi, offset + n) - offset))
            offset += n
        runs.append(run)
    return runs


def _solve_block(
    block: nn.Module, targets: list[LinearTarget], stats: dict[str, InputStats], plan: OneShotPlan, executor: Executor
) -> list[LayerResult]:
    """All linears of a block as jobs, one per statistics group (q/k/v; o; gate/up; down), each solving its
    layers stacked along their rows with one factor; a group whose chain would hold the block up
    (``plan_slices``) is cut into row slices after a separate factor job. Run critical path first
    (``run_jobs``), so that slices waiting for the widest input's factor are not left for last."""
    method = get_method(plan.method)
    jobs = {t.name: LayerJob(_weight_name(t), plan.method, plan.level_for(t.name), plan.options, plan.sparsegpt)
            for t in targets}
    groups: dict[str, list[LinearTarget]] = {}
    for t in targets:
        groups.setdefault(t.group, []).append(t)
    stat_handles = {g: executor.put(stats.get(g, InputStats("none", ts[0].in_features))) for g, ts in groups.items()}
    shared = {g: has_shared_factor(jobs[ts[0].name]) for g, ts in groups.items()}
    separable = method.slices_pay and all(row_separable(j) for j in jobs.values())
    parts = plan_slices({g: (sum(t.out_features for t in ts), ts[0].in_features, shared[g]) for g, ts in groups.items()},
                        executor.parallelism if separable else 1)
    work, pieces = [], {}  # pieces: job key -> [(target, first row, end row)] it solves, in row order
    for g, ts in groups.items():
        cols, split = ts[0].in_features, parts[g] > 1
        if split and shared[g]:
            work.append(Job(("factor", g), shared_factor, (jobs[ts[0].name], stat_handles[g]), method.factor_cost(cols)))
        for i, run in enumerate(row_runs([t.out_features for t in ts], parts[g])):
            piece = [(ts[k], r0, r1) for k, r0, r1 in run]
            weights = [block.get_submodule(t.rel).weight.detach()[r0:r1] for t, r0, r1 in piece]
            factor = After(("factor", g)) if split and shared[g] else None
            inside = method.factor_cost(cols) if shared[g] and not split else 0.0  # the job makes its own factor
            cost = method.cost(sum(r1 - r0 for _, r0, r1 in piece), cols) + inside
            key = ("solve", g, i)
            work.append(Job(key, solve_layers, ([jobs[t.name] for t, _, _ in piece], weights, stat_handles[g], factor), cost))
            pieces[key] = piece
    handles = run_jobs(executor, work)
    parts_of: dict[str, list[LayerResult]] = {t.name: [] for t in targets}
    for key, results in zip(pieces, executor.gather([handles[k] for k in pieces])):
        for (t, _, _), result in zip(pieces[key], results):
            parts_of[t.name].append(result)  # slices come in row order
    return [merge_row_chunks(parts_of[t.name]) for t in targets]


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
    on_inputs_captured: Optional[Callable[[], None]] = None,
) -> OneShotOutcome:
    """Prune every target linear of ``model`` block by block (see the module docstring).

    ``on_block_start`` / ``on_block_done`` let a caller load a block's weights just in time and write
    and release them afterwards, so a model larger than memory can be walked; ``on_inputs_captured``
    says that the embedding part (before block 0) will not run again.
    """
    timer = timer or PhaseTimer()
    targets = prunable_linears(model, arch, plan.targets, plan.ignore)
    if not targets:
        raise ValueError(f"no linear layer matches targets={list(plan.targets)} ignore={list(plan.ignore)}")
    per_block = by_block(targets)
    needs = get_method(plan.method).stats
    blocks = decoder_blocks(model, arch)

    pruned_in: Optional[BlockInputs] = None
    dense_in: Optional[BlockInputs] = None
    if needs != "none" or plan.layer_error:
        with timer.phase("calibrate"):
            captured = capture_block_inputs(model, arch, windows, plan.batch_size)
        pruned_in = captured if needs != "none" else None
        dense_in = (captured.clone() if pruned_in is not None else captured) if plan.layer_error else None
        del captured  # or block 0's inputs stay alive to the end: one more activation stream
    if on_inputs_captured is not None:
        on_inputs_captured()

    masks = PackedMasks()
    reports: list[LayerReport] = []
    resumed = 0
    for k in tqdm(range(len(blocks)), desc=plan.describe(), unit="block"):
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
                    # the dense block's outputs are not needed: the pruned block's are propagated below
                    stats = collect_block_stats(block, pruned_in, groups, needs, f"{arch.blocks}.{k}",
                                                precision=plan.precision, outputs=False)[0]
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
                pruned_in = run_block(block, pruned_in, precision=plan.precision)
        for t in block_targets:  # every layer against its own level
            level = plan.level_for(t.name)
            if isinstance(level, NM):
                assert_nm(block.get_submodule(t.rel).weight, level, t.name)
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
