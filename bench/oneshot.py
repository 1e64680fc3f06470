"""One-shot 2:4 on SmolLM2-135M under ../shared/BENCHMARK.md: perplexity, layer error, seconds, memory.

Each method runs as its own `compressor prune` process (so peak RSS is per method) with the shipped
configs in configs/prune/. Prints a table and writes bench/results/oneshot.json.

    python bench/oneshot.py                      # all rows, full 589-window perplexity
    python bench/oneshot.py --max-windows 64     # quick variant (reported as such)
    python bench/oneshot.py --rows wanda sparsegpt --workers 1 2   # solve-stage scaling with 1 and 2 Ray workers
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from results_io import write_results  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = {  # BENCHMARK.md, official implementations, same protocol and machine class
    "wanda": {"ppl": 200.94, "error": 0.0644, "seconds": 292, "rss_gib": 1.24},
    "sparsegpt": {"ppl": 93.34, "error": 0.0386, "seconds": 429, "rss_gib": 1.30},
}
ROWS = {
    "magnitude": ("magnitude.yaml", []),
    "wanda": ("wanda.yaml", []),
    "sparsegpt": ("sparsegpt.yaml", []),
    "wanda+sparseswaps": ("sparseswaps.yaml", ["sparseswaps.warm_start=wanda"]),
    "wanda+sparseswaps+refit": ("sparseswaps.yaml", ["sparseswaps.warm_start=wanda", "sparseswaps.refit=true"]),
    "sparsegpt-mask+sparseswaps": ("sparseswaps.yaml", ["sparseswaps.warm_start=sparsegpt"]),
}


def run_row(name: str, out_root: Path, max_windows: int | None, workers: int, extra: list[str], reuse: bool) -> dict:
    config, overrides = ROWS[name]
    out = out_root / f"{name}-w{workers}"
    sets = overrides + extra + [f"executor.num_cpus={workers}", "executor.kind=ray"]
    if max_windows:
        sets.append(f"evaluation.max_windows={max_windows}")
    if reuse and (out / "report.json").is_file():
        print(f"reusing the finished run {out}", flush=True)
        cmd = None
    else:
        cmd = [sys.executable, "-m", "compressor.cli", "prune", "--config", str(ROOT / "configs" / "prune" / config),
               "--output", str(out), "--overwrite"] + [a for s in sets for a in ("--set", s)]
    if cmd:
        print("+", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True, cwd=ROOT)
    report = json.loads((out / "report.json").read_text())
    ppl = report.get("perplexity") or {}
    return {
        "row": name,
        "workers": workers,
        "perplexity": ppl.get("perplexity"),
        "eval_windows": ppl.get("windows"),
        "eval_note": ppl.get("note"),
        "mean_layer_error": report["summary"]["mean_layer_error"],
        "error_by_type": report["summary"]["error_by_type"],
        "warm_start_error": report["summary"].get("mean_warm_start_error"),
        "prune_seconds": report["timing"]["prune_seconds"],
        "solve_seconds": report["timing"].get("solve"),
        "peak_rss_gib": round(report["memory"]["peak_rss_bytes"] / 2**30, 3),
        "density": report["summary"]["density"],
        "run": str(out),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    ap.add_argument("--workers", nargs="+", type=int, default=[2], help="Ray worker CPUs per run")
    ap.add_argument("--max-windows", type=int, default=None, help="quick variant: first N evaluation windows")
    ap.add_argument("--out", default=str(ROOT / "runs" / "bench-oneshot"))
    ap.add_argument("--json", default=str(ROOT / "bench" / "results" / "oneshot.json"))
    ap.add_argument("--reuse", action="store_true", help="reuse rows whose run folder already holds a finished run")
    ap.add_argument("--set", dest="extra", action="append", default=[], help="extra config override for every row")
    args = ap.parse_args()

    results = [run_row(r, Path(args.out), args.max_windows, w, args.extra, args.reuse) for r in args.rows for w in args.workers]
    # rows measured earlier and not re-run now stay in the table (the JSON says which run each came from)
    fresh = {(r["row"], r["workers"]) for r in results}
    if Path(args.json).is_file():
        kept = [r for r in json.loads(Path(args.json).read_text())["results"] if (r["row"], r["workers"]) not in fresh]
        results = sorted(kept + results, key=lambda r: (list(ROWS).index(r["row"]) if r["row"] in ROWS else 99,
                                                        r["workers"]))
    for res in results:
        ref = REFERENCE.get(res["row"])
        if ref and res["perplexity"] and not res["eval_note"]:
            res["ppl_vs_reference"] = round(res["perplexity"] / ref["ppl"], 4)
        if ref:
            res["seconds_vs_reference"] = round(res["prune_seconds"] / ref["seconds"], 3)
            res["reference"] = ref
    wanda = next((r for r in results if r["row"] == "wanda"), None)
    for res in results:
        if wanda and res["mean_layer_error"] and wanda["mean_layer_error"]:
            res["error_vs_wanda"] = round(res["mean_layer_error"] / wanda["mean_layer_error"], 4)

    header = f"{'row':28s} {'wk':>2s} {'ppl':>9s} {'win':>4s} {'layer err':>9s} {'vs wanda':>8s} {'prune s':>8s} {'solve s':>8s} {'RSS GiB':>7s}"
    print(header)
    for r in results:
        ppl = f"{r['perplexity']:.2f}" if r["perplexity"] else "-"
        print(f"{r['row']:28s} {r['workers']:>2d} {ppl:>9s} {str(r['eval_windows'] or '-'):>4s} "
              f"{r['mean_layer_error']:9.4f} {r.get('error_vs_wanda', float('nan')):8.3f} {r['prune_seconds']:8.1f} "
              f"{(r['solve_seconds'] or 0):8.1f} {r['peak_rss_gib']:7.2f}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    write_results(args.json, {"protocol": "../shared/BENCHMARK.md", "results": results})
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
