"""Distributed mask learning on this machine: tokens/s and per-rank peak memory at TP=1, TP=2, PP=2 and
DP=2 on a small random LLaMA (2:4 masks, megatron-core workers placed by Ray), and the overhead of the
Ray driver (start-up, per step) against torchrun launching the same workers.

    python bench/distributed.py                     # all layouts through Ray, TP=2 and DP=2 also via torchrun
    python bench/distributed.py --layouts tp2 --torchrun tp2 --steps 6

The model is `compressor.models.random_init`'s "small" preset (hidden 256, 4 layers, 8 heads / 4 KV heads,
SmolLM2's 49k vocabulary); data: wiki.valid.tokens windows (../shared/BENCHMARK.md's training file).
Every layout uses the machine's 2 cores: 1 rank x 2 threads (TP=1) or 2 ranks x 1 thread.
Prints a table, writes bench/results/distributed.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from results_io import write_results  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "wikitext-2" / "wiki.valid.tokens"
LAYOUTS = {  # parallel sizes, and torch threads per rank so that every layout uses both cores
    "tp1": ({"tensor": 1, "pipeline": 1, "data": 1}, 2),
    "tp2": ({"tensor": 2, "pipeline": 1, "data": 1}, 1),
    "pp2": ({"tensor": 1, "pipeline": 2, "data": 1}, 1),
    "dp2": ({"tensor": 1, "pipeline": 1, "data": 2}, 1),
}


def config_dict(model: Path, layout: str, steps: int, seq_len: int, micro_batch: int, micro_batches: int) -> dict:
    parallel, threads = LAYOUTS[layout]
    return {
        "model": {"source": str(model), "dtype": "float32"},
        "maskllm": {"sparsity": "2:4", "logits_lr": 5e-3},
        "prior": {"kind": "none"},
        "train": {"data": {"source": str(DATA)}, "seq_len": seq_len, "micro_batch_size": micro_batch,
                  "steps": steps, "log_every": 1, "eval_every": None, "checkpoint_every": steps},
        "evaluation": {"enabled": False},
        "parallel": {**parallel, "micro_batches": micro_batches},
        "ray": {"num_cpus": 2, "cpus_per_worker": threads, "max_restarts": 0},
    }


def summarize(report: dict, wall: float) -> dict:
    logs = report["history"]["logs"]
    steady = logs[1:] or logs  # the first step includes warm-up (allocations, first collectives)
    step_s = statistics.median(r["seconds_per_step"] for r in steady)
    tokens_per_step = logs[0]["tokens"] / logs[0]["step"]
    timing = report["timing"]
    return {
        "seconds_per_step": round(step_s, 4),
        "tokens_per_second": round(tokens_per_step / step_s, 1),
        "tokens_per_step": tokens_per_step,
        "peak_rss_gib_per_rank": [round(b / 2**30, 3) for b in report["memory"]["peak_rss_bytes_per_rank"]],
        "load_seconds": round(timing.get("load", 0.0), 2),
        "train_seconds": round(timing.get("train", 0.0), 2),
        "wall_seconds": round(wall, 2),
        # everything that is neither model load nor the training loop: processes, Ray, rendezvous, teardown
        "overhead_seconds": round(wall - timing.get("load", 0.0) - timing.get("train", 0.0), 2),
        "final_loss": logs[-1]["loss"],
    }


def run_ray(cfg: dict, out: Path) -> dict:
    from compressor.config.base import validate_config
    from compressor.launch import launch
    from compressor.parallel.config import DistributedLearnConfig

    start = time.perf_counter()
    report = launch(validate_config(DistributedLearnConfig, cfg), out, overwrite=True)
    return summarize(report, time.perf_counter() - start)


def run_torchrun(cfg: dict, out: Path, port: int) -> dict:
    import shutil

    world = cfg["parallel"]["tensor"] * cfg["parallel"]["pipeline"] * cfg["parallel"]["data"]
    if out.exists():
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    cfg_file = out.parent / f"{out.name}.json"
    cfg_file.write_text(json.dumps(cfg))
    threads = cfg["ray"]["cpus_per_worker"]
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={world}", "--master-addr=127.0.0.1",
           f"--master-port={port}", str(Path(__file__).resolve()), "--rank-entry", str(cfg_file), str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": str(int(threads))}
    print("+", " ".join(cmd), flush=True)
    start = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT, env=env)
    wall = time.perf_counter() - start
    return summarize(json.loads((out / "report.json").read_text()), wall)


def rank_entry(cfg_file: str, out: str) -> None:
    """What torchrun starts on every rank: the same per-rank function the Ray actors run."""
    import torch

    from compressor.config.base import validate_config
    from compressor.parallel.config import DistributedLearnConfig
    from compressor.parallel.megatron_train import train_rank

    cfg = validate_config(DistributedLearnConfig, json.loads(Path(cfg_file).read_text()))
    torch.set_num_threads(int(cfg.ray.cpus_per_worker))
    train_rank(cfg, out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=list(LAYOUTS))
    ap.add_argument("--torchrun", nargs="*", default=["tp2", "dp2"], choices=list(LAYOUTS),
                    help="layouts also launched with torchrun, for the Ray overhead")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--micro-batch", type=int, default=2)
    ap.add_argument("--micro-batches", type=int, default=2, help="per step and data-parallel rank")
    ap.add_argument("--out", default=str(ROOT / "runs" / "bench-distributed"))
    ap.add_argument("--rank-entry", nargs=2, metavar=("CONFIG_JSON", "OUTPUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.rank_entry:
        rank_entry(*args.rank_entry)
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    from compressor.models.random_init import save_random_model

    out = Path(args.out)
    model = out / "small-llama"
    if not (model / "config.json").is_file():
        save_random_model(model, "small")
    rows = []
    for i, layout in enumerate(args.layouts):
        cfg = config_dict(model, layout, args.steps, args.seq_len, args.micro_batch, args.micro_batches)
        rows.append({"layout": layout, "launcher": "ray", **run_ray(cfg, out / f"{layout}-ray")})
        if layout in args.torchrun:
            rows.append({"layout": layout, "launcher": "torchrun",
                         **run_torchrun(cfg, out / f"{layout}-torchrun", 29640 + i)})
    base = next((r for r in rows if r["layout"] == "tp1"), None)
    print(f"\n{'layout':6s} {'launcher':9s} {'s/step':>7s} {'tok/s':>7s} {'vs TP1':>6s} {'peak RSS GiB per rank':>22s} "
          f"{'load s':>6s} {'overhead s':>10s}")
    for r in rows:
        if base:
            r["throughput_vs_tp1"] = round(r["tokens_per_second"] / base["tokens_per_second"], 3)
        rss = ", ".join(f"{x:.2f}" for x in r["peak_rss_gib_per_rank"])
        print(f"{r['layout']:6s} {r['launcher']:9s} {r['seconds_per_step']:7.3f} {r['tokens_per_second']:7.1f} "
              f"{r.get('throughput_vs_tp1', float('nan')):6.2f} {rss:>22s} {r['load_seconds']:6.1f} "
              f"{r['overhead_seconds']:10.1f}")
    ray_vs_torchrun = {}
    for layout in args.torchrun:
        pair = {r["launcher"]: r for r in rows if r["layout"] == layout}
        if len(pair) == 2:
            ray_vs_torchrun[layout] = {
                "startup_overhead_seconds": round(pair["ray"]["overhead_seconds"] - pair["torchrun"]["overhead_seconds"], 2),
                "per_step_ratio": round(pair["ray"]["seconds_per_step"] / pair["torchrun"]["seconds_per_step"], 3),
            }
            print(f"Ray vs torchrun ({layout}): +{ray_vs_torchrun[layout]['startup_overhead_seconds']:.1f} s start-up/"
                  f"teardown, per-step x{ray_vs_torchrun[layout]['per_step_ratio']:.3f}")
    result = {"machine": "2 CPU cores, gloo", "model": "random_init 'small' (hidden 256, 4 layers, 8/4 heads)",
              "settings": {k: v for k, v in vars(args).items() if k != "rank_entry"}, "rows": rows,
              "ray_vs_torchrun": ray_vs_torchrun}
    path = ROOT / "bench" / "results" / "distributed.json"
    write_results(path, result)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
