"""Tasks beyond perplexity (../shared/BENCHMARK.md): SmolLM2-135M dense and 2:4-pruned on the zero-shot
suite, LAMBADA, MMLU 5-shot, closed-book TriviaQA / NQ-open and in-context SQuAD, plus perplexity.

Each row is its own process: the one-shot rows are `compressor prune` runs whose final evaluation runs
every task on the pruned model in memory; dense and MaskLLM are `compressor eval` runs. Prints a table
(value ± standard error), writes bench/results/tasks.json and bench/results/tasks.png.

    python bench/tasks.py                                  # every row, full task sets (hours on 2 cores)
    python bench/tasks.py --limit 2 --max-windows 2 --rows dense magnitude \
        --set calibration.num_windows=4 --set executor.kind=inprocess   # smoke test (minutes; runs/bench-tasks/smoke.json)
    python bench/tasks.py --rows dense --parity            # + the harness's own CLI on PIQA and ARC-Easy
    python bench/tasks.py --reuse-prune runs/bench-oneshot # evaluate finished prune runs (<row>-w2) instead

MaskLLM evaluates a finished `compressor learn` run (`--maskllm-run`, default the one bench/maskllm.py
writes); the row is skipped when it does not exist.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from results_io import write_results  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TASKS = ["perplexity", "zero_shot", "lambada", "mmlu", "triviaqa", "nq_open", "squad_context"]
TEST_TEXT = "../shared/data/wikitext-2/wiki.test.raw"
PRUNE_ROWS = {  # row -> (config in configs/prune, overrides)
    "magnitude": ("magnitude.yaml", []),
    "wanda": ("wanda.yaml", []),
    "sparsegpt": ("sparsegpt.yaml", []),
    "sparsegpt-mask+sparseswaps": ("sparseswaps.yaml", ["sparseswaps.warm_start=sparsegpt"]),
}
ROWS = ["dense", *PRUNE_ROWS, "maskllm"]
PARITY_TASKS = {"piqa": "offline_piqa", "arc_easy": "offline_arc_easy"}


def eval_sets(args: argparse.Namespace) -> list[str]:
    sets = [f"evaluation.tasks=[{', '.join(args.tasks)}]", f"evaluation.data.source={TEST_TEXT}",
            f"evaluation.harness.batch_size={args.batch_size}", f"evaluation.harness.max_gen_toks={args.max_gen_toks}"]
    if args.limit:
        sets.append(f"evaluation.harness.limit={args.limit}")
    if args.max_windows:
        sets.append(f"evaluation.max_windows={args.max_windows}")
    return sets


def run(cmd: list[str]) -> float:
    print("+", " ".join(cmd), flush=True)
    start = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT)
    return time.perf_counter() - start


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "compressor.cli", *args]


def run_row(row: str, args: argparse.Namespace) -> dict | None:
    out = Path(args.out) / row
    sets = [a for s in eval_sets(args) for a in ("--set", s)]
    if row in PRUNE_ROWS and not args.reuse_prune:
        config, overrides = PRUNE_ROWS[row]
        seconds = run(cli("prune", "--config", str(ROOT / "configs" / "prune" / config), "--output", str(out),
                          "--overwrite", *[a for s in overrides + args.extra for a in ("--set", s)], *sets))
        report_path = out / "report.json"
    else:
        model = {"dense": "smollm2-135m", "maskllm": args.maskllm_run}.get(row) or str(Path(args.reuse_prune) / f"{row}-w2")
        if row != "dense" and not (Path(model) / "report.json").is_file():
            print(f"skipping {row}: no finished run at {model}", flush=True)
            return None
        report_path = out.with_suffix(".json")
        report_path.parent.mkdir(parents=True, exist_ok=True)
        seconds = run(cli("eval", "--model", model, "--output", str(report_path), *sets))
    report = json.loads(report_path.read_text())
    evaluation = report["evaluation"]
    return {"row": row, "tasks": evaluation["tasks"], "suite_seconds": evaluation["seconds"],
            "process_seconds": round(seconds, 1), "harness": evaluation["harness"], "dtype": evaluation["dtype"],
            "report": str(report_path)}


def parity(args: argparse.Namespace, dense: dict) -> dict:
    """The harness's own command line on the dense model, from its HF folder, against our dense row."""
    import os

    from compressor.eval.harness import TASK_DIR
    from compressor.models.loading import local_folder, resolve_source

    folder = local_folder(resolve_source("smollm2-135m"))
    out = Path(args.out) / "parity-cli"
    cmd = [sys.executable, "-m", "lm_eval", "run", "--model", "hf", "--model_args", f"pretrained={folder},dtype=float32",
           "--tasks", ",".join(PARITY_TASKS.values()), "--include_path", str(TASK_DIR), "--device", "cpu",
           "--batch_size", str(args.batch_size), "--output_path", str(out)]
    if args.limit:
        cmd += ["--limit", str(args.limit)]
    print("+", " ".join(cmd), flush=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    subprocess.run(cmd, check=True, cwd=ROOT, env=env)
    results = json.loads(max(out.rglob("results_*.json"), key=lambda p: p.stat().st_mtime).read_text())["results"]
    rows = {}
    for task in PARITY_TASKS:
        for metric in ("acc", "acc_norm"):
            ours, theirs = dense["tasks"][task]["metrics"][metric]["value"], results[task][f"{metric},none"]
            rows[f"{task}:{metric}"] = {"ours": ours, "lm_eval_cli": theirs, "equal": ours == theirs}
    return {"command": " ".join(cmd), "results": rows}


def table(results: list[dict]) -> str:
    from compressor.reporting.markdown import tasks_table

    return tasks_table({r["row"]: r["tasks"] for r in results})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", nargs="+", default=ROWS, choices=ROWS)
    ap.add_argument("--tasks", nargs="+", default=TASKS, help="evaluation.tasks of every row")
    ap.add_argument("--limit", type=int, help="smoke test: the first N documents of each task (not the benchmark)")
    ap.add_argument("--max-windows", type=int, help="quick variant: the first N perplexity windows")
    ap.add_argument("--batch-size", type=int, default=8)
    # The stock QA tasks allow 256 tokens; an answer is cut at its first line break / period / comma, and
    # exact match fails on anything longer than the answers anyway, so a cap only saves the idle generation.
    ap.add_argument("--max-gen-toks", type=int, default=32, help="cap on generated tokens (QA tasks)")
    ap.add_argument("--reuse-prune", help="folder of finished prune runs named <row>-w2 (bench/oneshot.py output)")
    ap.add_argument("--maskllm-run", default=str(ROOT / "runs" / "bench-maskllm" / "sparsegpt-prior"))
    ap.add_argument("--parity", action="store_true", help="also run `lm_eval --model hf` on PIQA and ARC-Easy (dense)")
    ap.add_argument("--out", default=str(ROOT / "runs" / "bench-tasks"))
    ap.add_argument("--set", dest="extra", action="append", default=[], help="extra override of the prune rows")
    ap.add_argument("--json", help="default bench/results/tasks.json; with --limit runs/bench-tasks/smoke.json")
    args = ap.parse_args()
    args.json = args.json or str(Path(args.out) / "smoke.json" if args.limit else ROOT / "bench" / "results" / "tasks.json")

    results = [r for r in (run_row(row, args) for row in args.rows) if r is not None]
    summary = {"protocol": "../shared/BENCHMARK.md (tasks beyond perplexity)", "limit": args.limit,
               "max_windows": args.max_windows, "results": results}
    dense = next((r for r in results if r["row"] == "dense"), None)
    if args.parity and dense:
        summary["parity"] = parity(args, dense)

    print(table(results))
    for r in results:
        print(f"{r['row']}: suite {r['suite_seconds']:.0f} s (harness tasks), process {r['process_seconds']:.0f} s")
    if "parity" in summary:
        for key, p in summary["parity"]["results"].items():
            print(f"parity {key}: ours {p['ours']:.6f} lm_eval CLI {p['lm_eval_cli']:.6f} {'equal' if p['equal'] else 'DIFFERENT'}")

    from compressor.reporting.plots import plot_task_bars

    json_path = Path(args.json)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    write_results(json_path, summary)
    chart = plot_task_bars({r["row"]: r["tasks"] for r in results}, json_path.with_suffix(".png"),
                           "SmolLM2-135M 2:4: task scores (± standard error)" + (f", first {args.limit} docs" if args.limit else ""))
    print(f"wrote {json_path}" + (f" and {chart}" if chart else ""))


if __name__ == "__main__":
    main()
