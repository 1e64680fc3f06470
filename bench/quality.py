"""Quality that generalizes (issue 20; ../shared/BENCHMARK.md): 2:4 SmolLM2-135M models scored on what users
measure, not only on WikiText-2. Each row is a model (the dense one, SparseGPT 2:4, and finished training
runs); each is evaluated twice with `compressor eval`, in its own process:

- WikiText-2 perplexity (wiki.test.raw) and the harness tasks (default: PIQA and ARC-Easy, the columns of
  the issue's first table; `--tasks zero_shot mmlu triviaqa` for the full set);
- perplexity on the held-out part of the offline training corpus (`corpus:heldout`, other domains).

Columns: both perplexities, each task's accuracy ± standard error, the mean over the zero-shot tasks,
the fraction of the dense-to-SparseGPT drop in mean accuracy a row recovers, whether it beats SparseGPT
by more than one standard error on every task, its WikiText-2 perplexity against dense, and the
training tokens and hours of the run (from its report.json).

    python bench/quality.py --runs runs/bench-sparse-training          # dense, sparsegpt and every finished arm
    python bench/quality.py --runs runs/bench-sparse-training --row recipe=runs/recipe-24 --tasks zero_shot mmlu
    python bench/quality.py --rows dense sparsegpt --limit 20 --max-windows 4 --json runs/bench-quality/smoke.json

Finished evaluations are reused with --reuse. Writes bench/results/quality.json (--json elsewhere), a
task chart next to it (.png) and a perplexity-against-accuracy chart (_tradeoff.png).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional
from results_io import write_results  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TEST_TEXT = str(ROOT.parent / "shared" / "data" / "wikitext-2" / "wiki.test.raw")
DENSE = "smollm2-135m"


def run(cmd: list[str]) -> float:
    print("+", " ".join(cmd), flush=True)
    start = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT, env={**os.environ, "RAY_AUTH_MODE": "disabled"})
    return time.perf_counter() - start


def evaluate(source: str, out: Path, sets: list[str], reuse: bool) -> dict:
    if not (reuse and out.is_file()):
        out.parent.mkdir(parents=True, exist_ok=True)
        run([sys.executable, "-m", "compressor.cli", "eval", "--model", source, "--output", str(out), "--overwrite",
             *[a for s in sets for a in ("--set", s)]])
    return json.loads(out.read_text())


def training(source: str) -> dict[str, Any]:
    """Tokens and hours of a training run (nothing for a model that was not trained)."""
    path = Path(source) / "report.json"
    if not path.is_file():
        return {"tokens": 0, "hours": 0.0}
    report = json.loads(path.read_text())
    logs = report.get("history", {}).get("logs") or []
    seconds = report.get("timing", {}).get("train") or 0.0
    return {"tokens": logs[-1]["tokens"] if logs else 0, "hours": round(seconds / 3600, 3)}


def discover(runs: Optional[str], names: Optional[list[str]], extra: list[str]) -> dict[str, str]:
    """Row label -> model source: dense, the runs folder's sparsegpt and finished arms, then --row ones."""
    rows = {"dense": DENSE}
    if runs:
        for folder in sorted(Path(runs).iterdir()):
            if (folder / "report.json").is_file() and (folder / "model").is_dir():
                # the sparse-training bench's `dense` arm is the dense model fine-tuned, not the reference
                rows["dense_finetuned" if folder.name == "dense" else folder.name] = str(folder)
    for item in extra:
        label, sep, source = item.partition("=")
        if not sep:
            raise SystemExit(f"--row {item!r}: write LABEL=MODEL (a run folder or a model alias)")
        rows[label] = source
    if names:
        missing = [n for n in names if n not in rows]
        if missing:
            raise SystemExit(f"no model for rows {missing}; known: {list(rows)}")
        rows = {n: rows[n] for n in names}
    return rows


def accuracy(tasks: dict, task: str, metric: str) -> tuple[float, Optional[float]]:
    m = tasks[task]["metrics"].get(metric) or tasks[task]["metrics"]["acc"]
    return m["value"], m.get("stderr")


def summarize(rows: dict[str, dict], zero_shot: list[str], metric: str) -> dict[str, dict]:
    """Mean accuracy, recovered fraction of the dense -> SparseGPT drop, beats-SparseGPT, ppl vs dense."""
    for r in rows.values():
        r["mean_zero_shot"] = statistics.fmean(accuracy(r["tasks"], t, metric)[0] for t in zero_shot) if zero_shot else None
        errors = [accuracy(r["tasks"], t, metric)[1] for t in zero_shot]
        # independent task samples: the standard error of a mean of n scores is sqrt(sum se^2) / n
        r["mean_zero_shot_stderr"] = (math.sqrt(sum(e * e for e in errors)) / len(errors)
                                      if zero_shot and None not in errors else None)
    dense, sgpt = rows.get("dense"), rows.get("sparsegpt")
    for label, r in rows.items():
        if dense:
            r["wiki_ppl_vs_dense"] = r["wiki_ppl"] / dense["wiki_ppl"]
        if dense and sgpt and zero_shot and dense["mean_zero_shot"] != sgpt["mean_zero_shot"]:
            r["recovered"] = (r["mean_zero_shot"] - sgpt["mean_zero_shot"]) / (dense["mean_zero_shot"] - sgpt["mean_zero_shot"])
        if sgpt and label not in ("dense", "sparsegpt"):
            r["beats_sparsegpt_every_task"] = all(
                accuracy(r["tasks"], t, metric)[0] - accuracy(sgpt["tasks"], t, metric)[0]
                > (accuracy(sgpt["tasks"], t, metric)[1] or 0.0) for t in zero_shot)
    return rows


def markdown(rows: dict[str, dict], scored: list[str], metric: str) -> str:
    from compressor.reporting.markdown import table, value_pm

    head = ["model", "WikiText-2 ppl", "held-out corpus ppl", *[f"{t} {metric}" for t in scored], "mean",
            "recovered", "beats SparseGPT on every task", "ppl / dense", "tokens", "hours"]
    body = []
    for label, r in rows.items():
        cells = []
        for t in scored:
            value, stderr = accuracy(r["tasks"], t, metric)
            cells.append(value_pm({"value": value, "stderr": stderr}))
        body.append([label, r["wiki_ppl"], r["heldout_ppl"], *cells, r.get("mean_zero_shot"), r.get("recovered"),
                     r.get("beats_sparsegpt_every_task"), r.get("wiki_ppl_vs_dense"), r["tokens"], r["hours"]])
    return table(head, body)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", help="a folder of run folders (bench/sparse_training.py's output): each is a row")
    ap.add_argument("--row", action="append", default=[], help="LABEL=MODEL, an extra row (repeatable)")
    ap.add_argument("--rows", nargs="+", help="only these rows, in this order")
    ap.add_argument("--tasks", nargs="+", default=["piqa", "arc_easy"], help="evaluation.tasks besides perplexity")
    ap.add_argument("--metric", default="acc", help="the accuracy metric of each task (acc_norm where a task has it)")
    ap.add_argument("--limit", type=int, help="smoke test: the first N documents of each task (not the benchmark)")
    ap.add_argument("--max-windows", type=int, help="quick variant: the first N WikiText-2 windows (default all 589)")
    ap.add_argument("--heldout-windows", type=int, default=256, help="windows of corpus:heldout (512 tokens each)")
    ap.add_argument("--dtype", default="float32", help="evaluation.dtype (the protocol's figures are float32)")
    ap.add_argument("--batch-size", type=int, default=8, help="harness batch size")
    ap.add_argument("--reuse", action="store_true", help="keep finished evaluations")
    ap.add_argument("--out", default=str(ROOT / "runs" / "bench-quality"))
    ap.add_argument("--json", default=str(ROOT / "bench" / "results" / "quality.json"))
    args = ap.parse_args()

    from compressor.eval.tasks import resolve_tasks

    specs = [s for s in resolve_tasks(args.tasks) if s.name != "perplexity"]
    zero_shot = [s.name for s in specs if s.family == "zero_shot"]
    common = [f"evaluation.dtype={args.dtype}", f"evaluation.harness.batch_size={args.batch_size}"]
    tasks_sets = [f"evaluation.tasks=[perplexity, {', '.join(s.name for s in specs)}]",
                  f"evaluation.data.source={TEST_TEXT}", *common]
    if args.limit:
        tasks_sets.append(f"evaluation.harness.limit={args.limit}")
    if args.max_windows:
        tasks_sets.append(f"evaluation.max_windows={args.max_windows}")
    heldout_sets = ["evaluation.tasks=[perplexity]", "evaluation.data.source=corpus:heldout",
                    f"evaluation.max_windows={args.heldout_windows}", *common]

    rows: dict[str, dict] = {}
    out = Path(args.out)
    for label, source in discover(args.runs, args.rows, args.row).items():
        scored = evaluate(source, out / f"{label}.json", tasks_sets, args.reuse)
        heldout = evaluate(source, out / f"{label}-heldout.json", heldout_sets, args.reuse)
        rows[label] = {"source": source, "wiki_ppl": scored["perplexity"]["perplexity"],
                       "wiki_windows": scored["perplexity"]["windows"],
                       "heldout_ppl": heldout["perplexity"]["perplexity"], "heldout_windows": heldout["perplexity"]["windows"],
                       "tasks": {k: v for k, v in scored["evaluation"]["tasks"].items() if k != "perplexity"},
                       "eval_seconds": scored["timing"].get("evaluate"), **training(source)}
    summarize(rows, zero_shot, args.metric)
    scored_tasks = [s.name for s in specs if s.family in ("zero_shot", "knowledge", "retrieval", "language_modeling")]
    table = markdown(rows, [t for t in scored_tasks if all(t in r["tasks"] for r in rows.values())], args.metric)
    print(table)

    from compressor.reporting.plots import plot_task_bars, plot_tradeoff

    json_path = Path(args.json)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    summary = {"protocol": "../shared/BENCHMARK.md; WikiText-2 over "
                           f"{next(iter(rows.values()))['wiki_windows']} windows, corpus:heldout over "
                           f"{args.heldout_windows}, harness tasks" + (f" (first {args.limit} docs)" if args.limit else " (full)"),
               "settings": vars(args), "rows": rows, "table": table}
    write_results(json_path, summary)
    plot_task_bars({label: r["tasks"] for label, r in rows.items()}, json_path.with_suffix(".png"),
                   "SmolLM2-135M 2:4: task scores (± standard error)")
    if zero_shot:
        plot_tradeoff({label: (r["wiki_ppl"], r["mean_zero_shot"], r["mean_zero_shot_stderr"]) for label, r in rows.items()},
                      json_path.with_name(json_path.stem + "_tradeoff.png"), "WikiText-2 perplexity against task accuracy",
                      "WikiText-2 perplexity (log)", f"mean {args.metric} ({', '.join(zero_shot)})")
    print(f"wrote {json_path}")


if __name__ == "__main__":
    main()
