"""The one-shot solve stage alone: one SmolLM2-135M-shaped decoder block (q/k/v/o/gate/up/down with
their real shapes; Gram matrices from random inputs, since SparseGPT's cost does not depend on their
values) solved by `_solve_block` in process and with 1 and 2 Ray workers. Each setting runs in its own
process (with its own local Ray cluster), and the block is solved by each in turn, round after round,
so that a shared host's drifting speed hits all settings alike; reports medians, and the median of
the per-round ratios. Complements `bench/oneshot.py`, whose solve figure comes from one whole run.

    python bench/solve_stage.py --repeats 10
Writes bench/results/solve_stage.json and bench/results/solve_stage.png (seconds per round).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import time
from pathlib import Path

import torch
from torch import nn
from results_io import write_results  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {"self_attn.q_proj": (576, 576, "attn_in"), "self_attn.k_proj": (192, 576, "attn_in"),
          "self_attn.v_proj": (192, 576, "attn_in"), "self_attn.o_proj": (576, 576, "attn_out"),
          "mlp.gate_proj": (1536, 576, "mlp_in"), "mlp.up_proj": (1536, 576, "mlp_in"),
          "mlp.down_proj": (576, 1536, "mlp_out")}


def block_problem(tokens: int = 4096):
    from compressor.calibration.stats import InputStats
    from compressor.models.layers import LinearTarget

    g = torch.Generator().manual_seed(0)
    block, targets, stats = nn.Module(), [], {}
    for rel, (out, inp, group) in SHAPES.items():
        parent = block
        for part in rel.split(".")[:-1]:
            if not hasattr(parent, part):
                parent.add_module(part, nn.Module())
            parent = getattr(parent, part)
        parent.add_module(rel.split(".")[-1], nn.Linear(inp, out, bias=False))
        targets.append(LinearTarget(rel, 0, rel, group, out, inp))
        if group not in stats:
            x = torch.randn(tokens, inp, generator=g, dtype=torch.float64)
            stats[group] = InputStats("gram", inp, tokens, gram=x.T @ x)
    return block, targets, stats


SETTINGS = {"in-process": ("inprocess", 1), "ray, 1 worker": ("ray", 1), "ray, 2 workers": ("ray", 2)}


def serve(kind: str, workers: int, conn) -> None:
    """In a child process: set up, then time one block solve per request until told to stop."""
    from compressor.execution.base import ExecutorConfig, make_executor
    from compressor.methods.registry import SparseGPTOptions
    from compressor.pipelines.sequential import OneShotPlan, _solve_block
    from compressor.sparsity import NM

    block, targets, stats = block_problem()
    plan = OneShotPlan("sparsegpt", NM(2, 4), SparseGPTOptions())
    torch.set_num_threads(1)  # as each Ray task does
    with make_executor(ExecutorConfig(kind=kind, num_cpus=workers, object_store_mb=500)) as executor:
        _solve_block(block, targets, stats, plan, executor)  # warm-up: worker start, imports
        conn.send("ready")
        while conn.recv() == "go":
            start = time.perf_counter()
            _solve_block(block, targets, stats, plan, executor)
            conn.send(time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=10, help="rounds; each solves the block once per setting")
    args = ap.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ctx = multiprocessing.get_context("spawn")
    children = {}
    for name, (kind, workers) in SETTINGS.items():  # started one at a time: set-up is CPU-heavy
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=serve, args=(kind, workers, child), daemon=True)
        proc.start()
        if parent.recv() != "ready":
            raise RuntimeError(f"{name}: set-up failed")
        children[name] = (proc, parent)
    rows: dict[str, list[float]] = {name: [] for name in SETTINGS}
    for _ in range(args.repeats):
        for name, (_, conn) in children.items():
            conn.send("go")
            rows[name].append(conn.recv())
    for proc, conn in children.values():
        conn.send("stop")
        proc.join(timeout=60)
    medians = {k: statistics.median(v) for k, v in rows.items()}
    ratios = [a / b for a, b in zip(rows["ray, 1 worker"], rows["ray, 2 workers"])]
    speedup = statistics.median(ratios)
    print(f"{'setting':16s} {'median s/block':>14s}")
    for k, m in medians.items():
        print(f"{k:16s} {m:14.3f}")
    print(f"2 workers vs 1: {speedup:.2f}x (median of {len(ratios)} rounds; range {min(ratios):.2f}-{max(ratios):.2f})")
    out = {"what": "SparseGPT 2:4, one SmolLM2-135M-shaped block, _solve_block", "repeats": args.repeats,
           "seconds": rows, "median_seconds": medians, "speedup_2_vs_1": round(speedup, 3),
           "speedup_per_round": [round(r, 3) for r in ratios]}
    write_results(ROOT / "bench" / "results" / "solve_stage.json", out)
    from compressor.reporting.plots import plot_lines

    plot_lines({k: list(enumerate(v, 1)) for k, v in rows.items()}, ROOT / "bench" / "results" / "solve_stage.png",
               f"SparseGPT 2:4, one SmolLM2-135M block (2 workers vs 1: {speedup:.2f}x)", "round", "seconds per block")


if __name__ == "__main__":
    main()
