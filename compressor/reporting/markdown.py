"""Markdown renderings of run reports."""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def prune_report_markdown(report: Mapping[str, Any]) -> str:
    s = report["summary"]
    parts = [
        f"# {report['method']} {report['sparsity']} on {report['model']['source']}",
        "",
        table(["metric", "value"], [
            ["pruned linears", s["linears"]],
            ["density of pruned linears", s["density"]],
            ["N:M pattern verified", s["pattern_ok"]],
            ["mean layer error (dense inputs)", s.get("mean_layer_error")],
            ["prune seconds (calibrate + solve)", report["timing"]["prune_seconds"]],
            ["peak RSS GiB", round(report["memory"]["peak_rss_bytes"] / 2**30, 3)],
            ["peak RSS GiB by phase", phase_peaks(report)],
        ]),
    ]
    for key, label in (("dense_perplexity", "dense"), ("perplexity", "pruned")):
        ppl = report.get(key)
        if ppl:
            note = f" ({ppl['note']})" if ppl.get("note") else ""
            parts.append(f"\n**Perplexity, {label}:** {ppl['perplexity']:.3f} over {ppl['windows']} windows of "
                         f"{ppl['window_length']}{note}")
    parts += plan_markdown(report.get("plan"))
    if s.get("error_by_type"):
        parts += ["", "## Mean layer error by type", "",
                  table(["type", "error"], sorted(s["error_by_type"].items()))]
    parts += evaluation_markdown(report)
    for plot in report.get("outputs", {}).get("plots", []):
        parts += ["", f"![{plot}]({plot})"]
    return "\n".join(parts) + "\n"


def phase_peaks(report: Mapping[str, Any]) -> Optional[str]:
    """``load 0.61, calibrate 0.72, ...``: where this process's memory peaked (None where not measured)."""
    memory = report.get("memory", {})
    peaks = memory.get("peak_rss_bytes_by_phase")
    if not peaks:
        return None
    cost = memory.get("accounting_seconds")
    cost = f" (measured at {memory['accounting_boundaries']} boundaries, {cost:.2f} s)" if cost is not None else ""
    return ", ".join(f"{k} {v / 2**30:.3f}" for k, v in peaks.items()) + cost


def plan_markdown(plan: Optional[Mapping[str, Any]]) -> list[str]:
    """The per-layer level table of a run with a sparsity plan (nothing for a uniform run)."""
    if not plan:
        return []
    declared = f", declared target {plan['target']}" if plan.get("target") is not None else ""
    return ["", "## Sparsity plan", "",
            f"From `{plan['file']}`: parameter-weighted average sparsity {plan['average_sparsity']:.6f} "
            f"(exactly {plan['average_sparsity_exact']} of {plan['parameters']} weights{declared}).", "",
            table(["layer", "shape", "level", "sparsity"],
                  [[r["name"], f"{r['out']} x {r['in']}", r["level"], r["sparsity"]] for r in plan["levels"]])]


def learn_report_markdown(report: Mapping[str, Any]) -> str:
    """`compressor learn`: the method, the final model's pattern and perplexity, the training curve."""
    flops = report.get("flops_per_micro_batch") or {}
    logs = report["history"]["logs"]
    steady = logs[1:] or logs  # the first window includes warm-up
    rows = [
        ["method", report["method"]],
        ["sparsity", report.get("sparsity") or "dense (control)"],
        ["backend", f"{report['backend']} x {report['world_size']}"],
        ["training tokens", logs[-1]["tokens"] if logs else 0],
        ["tokens / s", sum(r["tokens_per_second"] for r in steady) / len(steady) if steady else None],
        ["N:M pattern verified", report.get("pattern_ok")],
        ["mask change vs step 0 (fraction of weights)", report.get("mask_change_vs_start")],
        ["linear GEMM FLOPs vs dense: forward / backward", f"{flops.get('forward_vs_dense', 1):.3g} / "
                                                         f"{flops.get('backward_vs_dense', 1):.3g}"],
        ["precision", _precision(report)],
        ["peak RSS GiB", round(report["memory"]["peak_rss_bytes"] / 2**30, 3)],
        ["peak RSS GiB by phase", phase_peaks(report)],
    ]
    parts = [f"# {report['method']} {report.get('sparsity') or ''} on {report['model']['source']}", "",
             table(["metric", "value"], rows)]
    parts += plan_markdown(report.get("plan"))
    ppl = report.get("perplexity")
    if ppl:
        note = f" ({ppl['note']})" if ppl.get("note") else ""
        parts.append(f"\n**Perplexity of the final model:** {ppl['perplexity']:.3f} over {ppl['windows']} windows of "
                     f"{ppl['window_length']}{note}")
    evals = report["history"]["evals"]
    if evals:
        parts += ["", "## Hard-mask perplexity during training", "",
                  table(["step", "tokens", "perplexity"], [[e["step"], e["tokens"], e["perplexity"]] for e in evals])]
    parts += evaluation_markdown(report)
    for plot in report.get("outputs", {}).get("plots", []):
        parts += ["", f"![{plot}]({plot})"]
    if report.get("outputs", {}).get("tensorboard"):
        parts += ["", f"Training curves for TensorBoard: `tensorboard --logdir {report['outputs']['tensorboard']}`"]
    return "\n".join(parts) + "\n"


def _precision(report: Mapping[str, Any]) -> Any:
    p = report.get("precision")
    return f"compute {p['compute']}, statistics {p['statistics']} (bf16 hardware: {p['bf16_hardware']})" if p else None


def value_pm(metric: Mapping[str, Any]) -> str:
    """``0.6123 ± 0.0114``."""
    stderr = metric.get("stderr")
    return f"{metric['value']:.4g}" + (f" ± {stderr:.2g}" if stderr is not None else "")


def tasks_table(series: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> str:
    """One row per task metric, one column per series (e.g. dense, final; or one per run)."""
    rows: dict[tuple[str, str], dict[str, str]] = {}
    notes: dict[str, str] = {}
    for label, tasks in series.items():
        for task, result in tasks.items():
            for name, m in result["metrics"].items():
                rows.setdefault((task, name), {})[label] = value_pm(m)
            if result.get("note"):
                notes.setdefault(task, result["note"])
    body = [[task, name + (" ↑" if _hib(series, task, name) else " ↓" if _hib(series, task, name) is False else ""),
             *[cells.get(label) for label in series], notes.pop(task, None)] for (task, name), cells in rows.items()]
    return table(["task", "metric", *series, "note"], body)


def _hib(series: Mapping[str, Mapping[str, Any]], task: str, name: str) -> Any:
    for tasks in series.values():
        if task in tasks and name in tasks[task]["metrics"]:
            return tasks[task]["metrics"][name].get("higher_is_better")
    return None


def evaluation_markdown(report: Mapping[str, Any]) -> list[str]:
    """The tasks section of a run's page (with the dense baseline beside it when present)."""
    series = {label: report[key]["tasks"] for key, label in (("dense_evaluation", "dense"), ("evaluation", "final"))
              if report.get(key)}
    if not series:
        return []
    info = report["evaluation"] if report.get("evaluation") else report["dense_evaluation"]
    harness = info.get("harness") or {}
    how = f"evaluated in {info['dtype']}" + (f", lm-eval {harness.get('lm_eval')}" if harness else "")
    return ["", "## Evaluation tasks", "", f"Value ± standard error; {how}.", "", tasks_table(series)]
