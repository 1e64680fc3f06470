"""`compressor report RUN [RUN ...]`: one Markdown page with PNG charts that compares runs side by side.

It reads the ``report.json`` of any command (prune, learn, launch, search: a run folder; eval: its
``--output`` JSON file) and shows what each has: perplexity, every evaluation task with its standard
error, per-layer errors and sparsity by decoder block, timings, the training curves of mask-learning
runs, and the plans of mixed-sparsity searches (each plan's fitness, perplexity and evaluations).
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

from compressor.errors import CompressorError
from compressor.reporting.markdown import table, tasks_table, value_pm
from compressor.reporting.plots import plot_grouped_bars, plot_lines, plot_task_bars
from compressor.reporting.summary import weighted_density
from compressor.utils.fs import atomic_write_text

PAGE = "report.md"


@dataclass(frozen=True)
class Run:
    label: str
    path: Path  # the report.json
    report: dict[str, Any]


def load_runs(sources: list[str | Path]) -> list[Run]:
    """Each source is a run folder (its report.json) or a report JSON file; labels are folder names,
    lengthened by their parents where two would be equal."""
    paths = []
    for source in map(Path, sources):
        path = source / "report.json" if source.is_dir() else source
        if not path.is_file():
            raise CompressorError(f"{source} has no report.json (an unfinished run?) and is not a report JSON file")
        paths.append(path)
    names = [_name(p, 1) for p in paths]
    depth = 1
    while len(set(names)) < len(names) and depth < 4:
        depth += 1
        names = [_name(p, depth) for p in paths]
    runs = []
    for name, path in zip(names, paths):
        try:
            runs.append(Run(name, path, json.loads(path.read_text())))
        except json.JSONDecodeError as exc:
            raise CompressorError(f"{path} is not valid JSON: {exc}") from None
    return runs


def _name(path: Path, depth: int) -> str:
    parts = (path.parent.parts if path.name == "report.json" else (*path.parent.parts, path.stem))[-depth:]
    return "/".join(parts)


def kind_of(report: Mapping[str, Any]) -> str:
    """What wrote the report: "prune wanda 2:4", "learn maskllm 2:4 (deepspeed)", "search sparsegpt 0.7", "eval"."""
    if "searches" in report:
        cfg = report.get("config", {})
        return f"search {cfg.get('method', '')} {cfg.get('target', '')}".strip()
    if "method" not in report:
        return "eval"
    backend = report.get("backend")
    verb = "prune" if backend is None else "launch" if backend == "megatron" else "learn"
    return f"{verb} {report['method']} {report.get('sparsity', '')}".strip() + (f" ({backend})" if backend else "")


def tasks_of(report: Mapping[str, Any]) -> dict[str, Any]:
    """The report's task results; older reports (and launch runs) have only a perplexity."""
    if (report.get("evaluation") or {}).get("tasks"):
        return dict(report["evaluation"]["tasks"])
    ppl = report.get("perplexity")
    if isinstance(ppl, Mapping) and "perplexity" in ppl:
        return {"perplexity": {"metrics": {"perplexity": {"value": ppl["perplexity"], "stderr": ppl.get("stderr"),
                                                           "higher_is_better": False}},
                               "samples": ppl.get("windows"), "note": ppl.get("note")}}
    return {}


def block_series(layers: list[Mapping[str, Any]], value) -> list[tuple[float, float]]:
    """(block, value(rows of that block)) in block order."""
    blocks: dict[int, list[Mapping[str, Any]]] = defaultdict(list)
    for row in layers:
        blocks[row["block"]].append(row)
    return [(b, value(rows)) for b, rows in sorted(blocks.items()) if value(rows) is not None]


def mean_error(rows: list[Mapping[str, Any]]) -> Optional[float]:
    errors = [r["error"] for r in rows if r.get("error") is not None]
    return sum(errors) / len(errors) if errors else None


def overview_rows(runs: list[Run]) -> list[list[Any]]:
    rows = []
    for run in runs:
        r = run.report
        ppl = tasks_of(r).get("perplexity", {}).get("metrics", {}).get("perplexity")
        summary = r.get("summary", {})
        model = r.get("model")
        rows.append([run.label, kind_of(r), model.get("source") if isinstance(model, Mapping) else model,
                     value_pm(ppl) if ppl else None, summary.get("mean_layer_error"),
                     1 - summary["density"] if "density" in summary else None,
                     round(r["memory"]["peak_rss_bytes"] / 2**30, 3) if r.get("memory", {}).get("peak_rss_bytes") else None])
    return rows


def timing_rows(runs: list[Run]) -> dict[str, dict[str, tuple[float, None]]]:
    """{run: {phase: (seconds, None)}} of the phases each report timed."""
    return {run.label: {k: (float(v), None) for k, v in run.report.get("timing", {}).items() if isinstance(v, (int, float))}
            for run in runs}


def dense_series(runs: list[Run]) -> dict[str, dict[str, Any]]:
    """The dense baselines the runs evaluated (``evaluation.dense_baseline``), one per base model."""
    series: dict[str, dict[str, Any]] = {}
    seen = set()
    for run in runs:
        dense = run.report.get("dense_evaluation")
        source = (run.report.get("model") or {}).get("source") if isinstance(run.report.get("model"), Mapping) else None
        if dense and source not in seen:
            seen.add(source)
            series[f"dense (from {run.label})"] = dense["tasks"]
    return series


def search_rows(runs: list[Run]) -> list[list[Any]]:
    """One row per plan of every search report: its fitness, perplexity (when evaluated), evaluations, average."""
    rows = []
    for run in runs:
        for name, s in (run.report.get("searches") or {}).items():
            rows.append([run.label, name, s.get("final_fitness"), (s.get("perplexity") or {}).get("perplexity"),
                         s.get("evaluations"), s.get("average"), s.get("plan")])
    return rows


def figure(chart: Optional[Path], title: str) -> list[str]:
    return ["", f"![{title}]({chart.name})"] if chart is not None else []


def write_comparison(sources: list[str | Path], output: str | Path) -> Path:
    """Write ``output/report.md`` and its charts; the page's path."""
    runs = load_runs(sources)
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    parts = [f"# Comparison of {len(runs)} runs", "",
             table(["run", "what", "model", "perplexity", "mean layer error", "sparsity", "peak RSS GiB"],
                   overview_rows(runs)),
             "", table(["run", "report"], [[run.label, str(run.path)] for run in runs])]

    ppl = {run.label: {"perplexity": (m["value"], m.get("stderr"))} for run in runs
           if (m := tasks_of(run.report).get("perplexity", {}).get("metrics", {}).get("perplexity"))}
    plans = search_rows(runs)
    ppl.update({f"{label}/{name}": {"perplexity": (p, None)} for label, name, _, p, *_ in plans if p is not None})
    if ppl:
        parts += ["", "## Perplexity"] + figure(plot_grouped_bars(
            ppl, out / "perplexity.png", "Perplexity (± standard error)", "perplexity", logy=True), "perplexity")
    if plans:
        parts += ["", "## Mixed-sparsity searches", "",
                  table(["run", "search", "final fitness", "perplexity", "evaluations", "average", "plan"], plans)]
    series = {run.label: tasks_of(run.report) for run in runs}
    series.update(dense_series(runs))
    if any(series.values()):
        parts += ["", "## Evaluation tasks", "", "Value ± standard error (↑ higher is better, ↓ lower).", "",
                  tasks_table(series)]
        parts += figure(plot_task_bars(series, out / "tasks.png", "Task scores (± standard error)"), "task scores")

    layered = {run.label: run.report["layers"] for run in runs  # a search report's "layers" is a count
               if isinstance(run.report.get("layers"), list) and run.report["layers"]}
    errors = {label: block_series(layers, mean_error) for label, layers in layered.items()}
    if any(errors.values()):
        by_type = {run.label: run.report["summary"]["error_by_type"] for run in runs
                   if run.report.get("summary", {}).get("error_by_type")}
        types = sorted({t for v in by_type.values() for t in v})
        parts += ["", "## Per-layer error (dense inputs)", "",
                  table(["type", *by_type], [[t, *[v.get(t) for v in by_type.values()]] for t in types])]
        parts += figure(plot_lines(errors, out / "layer_error.png", "Mean relative layer error per decoder block",
                                   "decoder block", "relative output error"), "layer error by block")
    sparsity = {label: block_series(layers, lambda rows: 1 - weighted_density(rows)) for label, layers in layered.items()}
    if any(sparsity.values()):
        parts += ["", "## Sparsity by decoder block"] + figure(plot_lines(
            sparsity, out / "sparsity.png", "Sparsity of the pruned linears per decoder block", "decoder block",
            "sparsity"), "sparsity by block")

    timings = timing_rows(runs)
    if any(timings.values()):
        phases = list(dict.fromkeys(p for t in timings.values() for p in t))
        parts += ["", "## Timings (seconds)", "",
                  table(["phase", *timings], [[p, *[t[p][0] if p in t else None for t in timings.values()]]
                                              for p in phases])]
        parts += figure(plot_grouped_bars(timings, out / "timings.png", "Wall-clock seconds by phase", "seconds"),
                        "timings")

    curves = {run.label: run.report["history"] for run in runs if isinstance(run.report.get("history"), Mapping)}
    loss = {label: [(r["tokens"], r["loss"]) for r in h.get("logs", [])] for label, h in curves.items()}
    hard = {label: [(r["tokens"], r["perplexity"]) for r in h.get("evals", [])] for label, h in curves.items()}
    if any(loss.values()) or any(hard.values()):
        parts += ["", "## Mask learning"]
        if any(loss.values()):
            parts += figure(plot_lines(loss, out / "training_loss.png", "Mask-learning loss", "training tokens",
                                       "LM loss"), "training loss")
        if any(hard.values()):
            parts += figure(plot_lines(hard, out / "training_perplexity.png", "Hard-mask perplexity during training",
                                       "training tokens", "perplexity", logy=True), "hard-mask perplexity")
    page = out / PAGE
    atomic_write_text(page, "\n".join(parts) + "\n")
    return page
