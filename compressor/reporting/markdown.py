"""Markdown renderings of run reports."""

from __future__ import annotations

from typing import Any, Mapping, Sequence


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
        ]),
    ]
    for key, label in (("dense_perplexity", "dense"), ("perplexity", "pruned")):
        ppl = report.get(key)
        if ppl:
            note = f" ({ppl['note']})" if ppl.get("note") else ""
            parts.append(f"\n**Perplexity, {label}:** {ppl['perplexity']:.3f} over {ppl['windows']} windows of "
                         f"{ppl['window_length']}{note}")
    if s.get("error_by_type"):
        parts += ["", "## Mean layer error by type", "",
                  table(["type", "error"], sorted(s["error_by_type"].items()))]
    for plot in report.get("outputs", {}).get("plots", []):
        parts += ["", f"![{plot}]({plot})"]
    return "\n".join(parts) + "\n"
