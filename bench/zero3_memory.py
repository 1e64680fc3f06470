"""Peak memory per rank of `compressor learn` on 2 DeepSpeed ZeRO-3 ranks (gloo): today's path, where
every rank loads the whole model (and the prior's copy) and `deepspeed.initialize` partitions it, against
the partitioned load (`deepspeed.zero3_partitioned_load`, the default since issue 19: model and masks
built under `zero.Init`, filled one parameter at a time; prior, checkpoints and outputs a layer at a time).

    python bench/zero3_memory.py                          # SmolLM2-135M (the smollm2-135m alias), 2 steps
    python bench/zero3_memory.py --model qwen2.5-coder-0.5b --steps 2
    python bench/zero3_memory.py --smoke                  # a tiny random model: proves the script runs (~2 min)

Each mode runs in fresh rank processes (peak RSS is a per-process high-water mark), 1 thread per rank.
Per rank it records the peak RSS after imports (the baseline of python + torch + DeepSpeed), at the
start of training (everything before: load, prior, masks, deepspeed.initialize) and at the end of the run
(training, checkpoint, outputs). The MaskLLM recipe: 2:4, magnitude prior, sample_every micro_batch,
one checkpoint at the last step, no evaluation; data: wiki.valid.tokens windows (../shared/BENCHMARK.md's
training file). Prints a table, writes bench/results/zero3_memory.json and bench/results/zero3_memory.png
(smoke mode: both into --out, so the measured results are never overwritten by a smoke run).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

from compressor.utils.env import peak_rss_bytes  # VmHWM: a spawned rank's own peak, not its parent's
from results_io import write_results  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "wikitext-2" / "wiki.valid.tokens"
MODES = {"whole": False, "partitioned": True}  # mode -> deepspeed.zero3_partitioned_load


def config_dict(model: str, partitioned: bool, steps: int, seq_len: int, port: int) -> dict:
    return {
        "model": {"source": model},
        "maskllm": {"sparsity": "2:4", "logits_lr": 1e-3, "prior_strength": 6.0, "sample_every": "micro_batch"},
        "prior": {"kind": "magnitude"},
        "train": {"data": {"source": str(DATA)}, "seq_len": seq_len, "micro_batch_size": 1, "steps": steps,
                  "log_every": 1, "eval_every": None, "checkpoint_every": steps},
        "evaluation": {"enabled": False},
        "backend": "deepspeed",
        "deepspeed": {"zero_stage": 3, "world_size": 2, "master_port": port, "zero3_partitioned_load": partitioned},
    }


def rank_entry(rank: int, world: int, cfg, out: str) -> None:
    """One rank: `compressor learn`'s own per-rank entry, with the peak RSS read at phase boundaries."""
    import deepspeed  # noqa: F401 (imported before the baseline is read, as every rank imports it)

    import compressor.runs.learn as learn

    marks = {"imports": peak_rss_bytes()}
    real_train = learn.train

    def train(*args, **kwargs):
        marks["before_train"] = peak_rss_bytes()  # load, prior, masks and deepspeed.initialize are done
        return real_train(*args, **kwargs)

    learn.train = train
    learn._worker(rank, world, cfg, out)
    marks["end"] = peak_rss_bytes()
    (Path(out) / f"rss_rank{rank}.json").write_text(json.dumps(marks))


def run_mode(model: str, mode: str, args, port: int) -> dict:
    import torch.multiprocessing as mp

    from compressor.config.base import validate_config
    from compressor.training.config import LearnConfig
    from compressor.utils.run_folder import open_run_folder

    out = Path(args.out) / mode
    if out.exists():
        shutil.rmtree(out)
    cfg = validate_config(LearnConfig, config_dict(model, MODES[mode], args.steps, args.seq_len, port))
    open_run_folder(out, "learn")
    os.environ["OMP_NUM_THREADS"] = "1"
    start = time.perf_counter()
    mp.spawn(rank_entry, args=(2, cfg, str(out)), nprocs=2, join=True)
    wall = time.perf_counter() - start
    report = json.loads((out / "report.json").read_text())
    marks = [json.loads((out / f"rss_rank{r}.json").read_text()) for r in range(2)]
    gib = lambda key: [round(m[key] / 2**30, 3) for m in marks]  # noqa: E731
    return {"mode": mode, "partitioned_load": MODES[mode],
            "peak_rss_gib_after_imports": gib("imports"), "peak_rss_gib_before_train": gib("before_train"),
            "peak_rss_gib_end": gib("end"),
            "load_seconds": round(report["timing"].get("load", 0.0), 2),
            "prior_seconds": round(report["timing"].get("prior", 0.0), 2),
            "save_seconds": round(report["timing"].get("save", 0.0), 2), "wall_seconds": round(wall, 1),
            "final_loss": report["history"]["logs"][-1]["loss"], "run": str(out)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m", help="a model source (alias, HF folder or .gguf)")
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--port", type=int, default=29651)
    ap.add_argument("--smoke", action="store_true", help="a tiny random LLaMA, 1 step: checks the script, measures nothing")
    ap.add_argument("--out", default=str(ROOT / "runs" / "bench-zero3"))
    args = ap.parse_args()
    model = args.model
    if args.smoke:
        from compressor.models.random_init import save_random_model

        model = str(Path(args.out) / "tiny-llama")
        if not (Path(model) / "config.json").is_file():
            save_random_model(model, "tiny")
        args.steps, args.seq_len = 1, 32
    rows = [run_mode(model, mode, args, args.port + 2 * i) for i, mode in enumerate(args.modes)]

    print(f"\n{'mode':12s} {'imports GiB':>16s} {'before train GiB':>18s} {'peak GiB':>14s} {'load s':>7s} "
          f"{'prior s':>7s} {'save s':>7s}")
    fmt = lambda xs: "/".join(f"{x:.2f}" for x in xs)  # noqa: E731  rank 0 / rank 1
    for r in rows:
        print(f"{r['mode']:12s} {fmt(r['peak_rss_gib_after_imports']):>16s} {fmt(r['peak_rss_gib_before_train']):>18s} "
              f"{fmt(r['peak_rss_gib_end']):>14s} {r['load_seconds']:7.1f} {r['prior_seconds']:7.1f} "
              f"{r['save_seconds']:7.1f}")
    results = Path(args.out) if args.smoke else ROOT / "bench" / "results"
    results.mkdir(parents=True, exist_ok=True)
    result = {"machine": "2 CPU cores, gloo, 2 ranks x 1 thread", "model": model, "smoke": args.smoke,
              "settings": {k: v for k, v in vars(args).items()}, "rows": rows}
    path = results / "zero3_memory.json"
    write_results(path, result)

    from compressor.reporting.plots import plot_grouped_bars

    bars = {r["mode"]: {f"rank {k} {phase}": (r[key][k], None) for k in range(2)
                        for phase, key in (("after imports", "peak_rss_gib_after_imports"),
                                           ("before train", "peak_rss_gib_before_train"),
                                           ("end", "peak_rss_gib_end"))} for r in rows}
    png = plot_grouped_bars(bars, results / "zero3_memory.png",
                            f"ZeRO-3 on 2 ranks, {Path(model).name}: peak RSS per rank", "peak RSS (GiB)")
    print(f"wrote {path} and {png}")


if __name__ == "__main__":
    main()
