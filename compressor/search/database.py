"""The level database: every prunable layer solved once at every level of the level set, from the
dense model's inputs (one pass of the dense model, block by block, as EvoPress builds its database), so
that any candidate is assembled from stored layers without solving anything.

On disk (``root/<linear name>/``), one safetensors file per entry, written atomically, so a killed build
continues with the missing entries only:
- ``<level>.safetensors``: ``mask`` bit-packed (``sparsity.bitpack``) and, for methods that change the
  kept weights (SparseGPT), ``values``: the kept weights in row-major order, float32. float32 because the
  search ranks candidates whose KL differ in the third digit; bf16 would move every kept weight by up to
  0.4%, float16 by 0.05%, and the assembled model would no longer be what the method computed. Storing only the
  kept values costs (1 - s) of a dense float32 tensor: ~1.1 GB for SmolLM2 at 0.5..0.9.
- Wanda: ``wanda-rank.safetensors``, each weight's rank by score within its row (unstructured) or its
  group of M (N:M), int16 (int32 for rows of 32768 or more). Level masks are nested: a level keeps the
  weights whose rank clears its cut, so there is one score per layer and no solve per level.
``owl.json`` holds each block's outlier ratios of the Wanda scores (OWL's input), from the same pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from torch import nn

from compressor.calibration import capture_block_inputs, collect_block_stats
from compressor.calibration.stats import InputStats
from compressor.execution.base import Executor
from compressor.methods.registry import LayerJob, get_method, has_shared_factor, shared_factor, solve_layers
from compressor.methods.wanda import wanda_scores
from compressor.models.arch import DecoderArch
from compressor.models.layers import LinearTarget, by_block, decoder_blocks
from compressor.precision import Precision
from compressor.search.owl import outlier_ratios
from compressor.sparsity import NM, SparsityTarget, pack_bits, unpack_bits
from compressor.sparsity.plan import level_text
from compressor.utils.fs import atomic_save_safetensors, atomic_write_json, read_json
from compressor.utils.logging import get_logger

log = get_logger(__name__)
RANK_FILE = "wanda-rank.safetensors"
OWL_FILE = "owl.json"


@dataclass(frozen=True)
class Database:
    """Where the entries live and how to read them (plain values: it travels to fitness jobs)."""

    root: str
    method: str
    levels: tuple[SparsityTarget, ...]

    @property
    def nested(self) -> bool:
        return self.method == "wanda"

    def entry(self, name: str, k: int) -> Path:
        return Path(self.root) / name / (RANK_FILE if self.nested else f"{level_text(self.levels[k])}.safetensors")

    def missing(self, names: Sequence[str]) -> list[tuple[str, int]]:
        ks = [0] if self.nested else range(len(self.levels))
        return [(n, k) for n in names for k in ks if not self.entry(n, k).is_file()]

    def weight(self, name: str, k: int, base: torch.Tensor,
               dense: Optional[Callable[[], torch.Tensor]] = None) -> torch.Tensor:
        """The pruned weight of layer ``name`` at level ``k``, of ``base``'s shape and dtype. ``dense()`` gives
        the layer's dense weight (default: ``base`` is it); called only for entries without values, so a
        caller holding SparseGPT's entries needs no dense copy."""
        from safetensors.torch import load_file

        data = load_file(str(self.entry(name, k)))
        dense = dense or (lambda: base)
        if self.nested:
            return dense() * nested_mask(data["rank"], self.levels[k])
        mask = unpack_bits(data["mask"], base.shape[1])
        if "values" not in data:
            return dense() * mask
        out = torch.zeros(base.shape, dtype=torch.float32)
        out[mask] = data["values"]
        return out.to(base.dtype)


def score_ranks(scores: torch.Tensor, levels_m: Optional[int]) -> torch.Tensor:
    """(out, in) scores -> int16 ascending rank of each weight within its row, or within its group of M."""
    view = scores if levels_m is None else scores.reshape(scores.shape[0], -1, levels_m)  # (out, in/M, M)
    order = view.argsort(dim=-1, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(-1, order, torch.arange(view.shape[-1]).expand_as(order).contiguous())
    return ranks.reshape(scores.shape).to(torch.int16 if view.shape[-1] < 2**15 else torch.int32)


def nested_mask(rank: torch.Tensor, level: SparsityTarget) -> torch.Tensor:
    """Kept weights at ``level``: the same cut as ``mask_from_scores`` (int(in * s) pruned per row; N:M keeps
    the top N of M), read off the ranks, so that every sparser level's mask lies inside the denser one's."""
    if isinstance(level, NM):
        return rank >= level.m - level.n
    return rank >= int(rank.shape[-1] * level.sparsity)


def wanda_ranks(weights: list[torch.Tensor], stats: InputStats, levels_m: Optional[int]) -> list[torch.Tensor]:
    """One job per statistics group: the ranks of every layer reading these inputs."""
    return [score_ranks(wanda_scores(w, stats.norms_sq), levels_m) for w in weights]


def _write(db: Database, name: str, k: int, mask: torch.Tensor, weight: Optional[torch.Tensor]) -> None:
    tensors = {"mask": pack_bits(mask)}
    if weight is not None:
        tensors["values"] = weight.float()[mask].contiguous()
    atomic_save_safetensors(tensors, db.entry(name, k))


@dataclass
class BuildReport:
    solved: int
    skipped: int
    blocks: int


def build_database(model: nn.Module, arch: DecoderArch, targets: list[LinearTarget], windows: torch.Tensor,
                   db: Database, options, sparsegpt_options, executor: Executor, owl_ms: Sequence[float],
                   batch_size: int = 8, precision: Precision = Precision()) -> BuildReport:
    """Solve the missing entries of ``db`` as jobs on ``executor`` (one per statistics group and level; a
    group's Hessian factor is one job shared by its levels) and write the OWL ratios. The dense stream
    runs on the driver; results of block k are written while block k + 1 is calibrated."""
    names = [t.name for t in targets]
    missing = set(db.missing(names))
    owl_path = Path(db.root) / OWL_FILE
    if not missing and owl_path.is_file():
        log.info("level database: all %d entries on disk", len(names) * (1 if db.nested else len(db.levels)))
        return BuildReport(0, len(names), 0)
    needs = get_method(db.method).stats
    kind = "gram" if needs == "gram" else "norms"  # norms at least: OWL's outlier ratios need them
    levels_m = db.levels[0].m if isinstance(db.levels[0], NM) else None
    blocks, per_block = decoder_blocks(model, arch), by_block(targets)
    inputs = capture_block_inputs(model, arch, windows, batch_size)
    ratios: dict[str, dict[str, float]] = {}
    pending: list[tuple[object, list[str], Optional[int]]] = []  # (handle, linear names, level or None = ranks)
    solved = 0
    for b in range(len(blocks)):
        block, block_targets = blocks[b], per_block.get(b, [])
        groups = [g for g in arch.input_groups if any(t.group == g.name for t in block_targets)]
        stats, inputs = collect_block_stats(block, inputs, groups, kind, f"{arch.blocks}.{b}", precision=precision)
        if block_targets:
            scores = [wanda_scores(block.get_submodule(t.rel).weight.detach(), stats[t.group].norms_sq)
                      for t in block_targets]
            ratios[f"{arch.blocks}.{b}"] = dict(zip(map(repr, owl_ms), outlier_ratios(scores, owl_ms)))
            del scores
        submitted = []
        for g in groups:
            ts = [t for t in block_targets if t.group == g.name]
            todo = sorted({k for t in ts for (n, k) in missing if n == t.name})
            if not todo:
                continue
            group_stats = stats[g.name] if needs != "none" else InputStats("none", ts[0].in_features)
            stats_h = executor.put(group_stats)
            weights_h = executor.put([block.get_submodule(t.rel).weight.detach() for t in ts])
            if db.nested:
                ranks = executor.submit(wanda_ranks, weights_h, stats_h, levels_m)
                submitted.append((ranks, [t.name for t in ts], None))
                continue
            jobs = {k: [LayerJob(f"{t.name}.weight", db.method, db.levels[k], options, sparsegpt_options) for t in ts]
                    for k in todo}
            factor = (executor.submit(shared_factor, jobs[todo[0]][0], stats_h)
                      if has_shared_factor(jobs[todo[0]][0]) else None)
            for k in todo:
                submitted.append((executor.submit(solve_layers, jobs[k], weights_h, stats_h, factor),
                                  [t.name for t in ts], k))
        solved += _drain(db, executor, pending, missing)  # the previous block's, while this one's run
        pending = submitted
    solved += _drain(db, executor, pending, missing)
    atomic_write_json(owl_path, ratios)
    return BuildReport(solved, len(names) * (1 if db.nested else len(db.levels)) - solved, len(blocks))


def _drain(db: Database, executor: Executor, pending: list, missing: set) -> int:
    count = 0
    for (_, names, k), results in zip(pending, executor.gather([h for h, _, _ in pending], desc="level database")):
        if k is None:  # Wanda ranks
            for name, rank in zip(names, results):
                if (name, 0) in missing:
                    atomic_save_safetensors({"rank": rank.contiguous()}, db.entry(name, 0))
                    count += 1
            continue
        for name, r in zip(names, results):
            if (name, k) in missing:
                _write(db, name, k, r.mask, r.weight)
                count += 1
    return count


def load_owl_ratios(db: Database) -> dict[str, dict[float, float]]:
    """{block: {M: outlier ratio}} as the build wrote it."""
    raw = read_json(Path(db.root) / OWL_FILE)
    return {b: {float(m): float(v) for m, v in r.items()} for b, r in raw.items()}
