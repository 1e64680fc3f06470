"""Cost growth with model size (issue 19), measured, next to what the memory predictor says.

For each size (SmolLM2-135M, Qwen2.5-Coder-0.5B and -1.5B; `make models` installs the Qwen models):
SparseGPT 2:4 prune time and peak RSS with ``model.lazy: true`` (block by block, in-process solver),
MaskLLM step time and peak RSS (a short single-process `compressor learn` from the prune run's masks),
perplexity dense / 2:4 on wiki.test.raw (../shared/BENCHMARK.md, all 589 windows unless --max-windows),
and the size of `compressor export`'s compressed 2:4 folder. Every step is its own CLI process, so each
peak RSS (report.json ``memory.peak_rss_bytes``, VmHWM; per phase in ``peak_rss_bytes_by_phase``) is that
step's alone. Each measured peak sits next to ``compressor.parallel.process_memory``'s prediction for the
same run (flagged beyond 15%), made with this host's process baselines, measured first (a minute: the
tiny random model's prune and learn, whose own terms are a few MB); a run
predicted not to fit in memory (--max-rss-gib) is skipped and shows its prediction only. Power laws
cost = c x params^k are fitted over the sizes and extrapolated to 7B and 15B.

    python bench/scale.py                                    # all three sizes, the full protocol
    python bench/scale.py --sizes smollm2-135m --max-windows 4 --calib-windows 8   # quick variant
    python bench/scale.py --smoke                            # a tiny random model, end to end in ~a minute
    python bench/scale.py --reuse                            # keep every finished step, redo the rest

Writes bench/results/scale.json (scale-smoke.json with --smoke) and bench/results/scale.png, prints a table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from compressor.parallel.memory_plan import GIB, PRESETS, dims_for_source  # noqa: E402
from compressor.parallel.process_memory import (  # noqa: E402
    LEARN_BASELINE, PRUNE_BASELINE, LearnSetup, PruneSetup, predict_learn, predict_prune,
)
from results_io import write_results  # noqa: E402

DATA = "../shared/data/wikitext-2"  # relative to the repository root, where every step runs
SIZES = ("smollm2-135m", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b")
EXTRAPOLATE = {"7B": ("llama2-7b", 7e9), "15B": ("nemotron4-15b-class", 15e9)}
TOLERANCE = 0.15


# glibc's default malloc raises its mmap threshold (up to 32 MiB) each time a mapped block is freed, so freed
# batch-sized tensors stay in the heap and a peak RSS measures the heap's history as much as the live tensors
# (one 96-window prune of a random hidden-512 model: 1234 MiB with the default, 860 MiB with a fixed
# threshold). A fixed threshold maps every block of 1 MiB or more on its own and returns it on free.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(2**20)}
RUN_ENV: dict[str, str] = dict(MALLOC_ENV)  # main(): empty with --glibc-default-malloc


def run(cmd: list[str], done: Path, reuse: bool, env: Optional[dict[str, str]] = None) -> None:
    """Run a CLI step unless ``reuse`` and its result file ``done`` exists."""
    if reuse and done.exists():
        print(f"reusing {done}", flush=True)
        return
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT, env={**os.environ, **(env if env is not None else RUN_ENV)})


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "compressor.cli", *args]


def sets(values: dict[str, Any]) -> list[str]:
    return [a for k, v in values.items() for a in ("--set", f"{k}={v}")]


def prune_settings(source: str, a: argparse.Namespace) -> dict[str, Any]:
    return {"model.source": source, "model.lazy": "true", "method": "sparsegpt", "sparsity": "2:4",
            "calibration.data.source": f"{DATA}/wiki.valid.tokens", "calibration.num_windows": a.calib_windows,
            "calibration.seq_len": a.seq_len, "evaluation.enabled": "false", "executor.kind": "inprocess"}


def learn_settings(source: str, prune_run: Path, a: argparse.Namespace) -> dict[str, Any]:
    return {"model.source": source, "maskllm.sparsity": "2:4", "prior.kind": "file", "prior.path": str(prune_run),
            "train.data.source": f"{DATA}/wiki.valid.tokens", "train.seq_len": a.seq_len,
            "train.micro_batch_size": a.micro_batch, "train.grad_accum": 1, "train.steps": a.steps, "train.log_every": 1,
            "train.eval_every": "null", "evaluation.enabled": "false"}


def eval_settings(a: argparse.Namespace) -> dict[str, Any]:
    values: dict[str, Any] = {"evaluation.data.source": f"{DATA}/wiki.test.raw", "evaluation.seq_len": a.seq_len}
    if a.max_windows:
        values["evaluation.max_windows"] = a.max_windows
    return values


def step_seconds(report: dict) -> Optional[float]:
    """Median seconds per step of the learn log rows after the first (step 1 allocates AdamW's state)."""
    rows = [r["seconds_per_step"] for r in report["history"]["logs"]]
    return statistics.median(rows[1:] if len(rows) > 1 else rows) if rows else None


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def measure_size(name: str, source: str, a: argparse.Namespace, out: Path, limit: float,
                 baselines: dict[str, float]) -> dict[str, Any]:
    dims = dims_for_source(source) if Path(source).is_dir() else PRESETS[name]
    pre_prune = predict_prune(dims, PruneSetup(num_windows=a.calib_windows, seq_len=a.seq_len,
                                               baseline=baselines["prune"]))
    pre_learn = predict_learn(dims, LearnSetup(micro_batch=a.micro_batch, seq_len=a.seq_len,
                                               baseline=baselines["learn"]))
    row: dict[str, Any] = {"size": name, "parameters": dims.total_params(),
                           "prune_predicted_gib": pre_prune.total / GIB, "prune_predicted_phase": pre_prune.phase,
                           "learn_predicted_gib": pre_learn.total / GIB, "learn_predicted_phase": pre_learn.phase,
                           "prune_predicted_terms_gib": {k: round(v / GIB, 4) for k, v in pre_prune.items.items()},
                           "learn_predicted_terms_gib": {k: round(v / GIB, 4) for k, v in pre_learn.items.items()}}
    prune_dir, learn_dir = out / "prune", out / "learn"
    if pre_prune.total > limit:
        row["prune_skipped"] = f"predicted {pre_prune.total / GIB:.1f} GiB > limit {limit / GIB:.1f} GiB"
        return row
    run(cli("prune", "--config", str(ROOT / "configs/prune/sparsegpt.yaml"), "--output", str(prune_dir), "--overwrite",
            *sets(prune_settings(source, a))), prune_dir / "report.json", a.reuse)
    report = json.loads((prune_dir / "report.json").read_text())
    row.update(prune_seconds=report["timing"]["prune_seconds"], prune_peak_gib=report["memory"]["peak_rss_bytes"] / GIB,
               mean_layer_error=report["summary"]["mean_layer_error"], pattern_ok=report["summary"]["pattern_ok"],
               prune_peak_by_phase_gib=_phase_gib(report))

    for which, model in (("dense", source), ("pruned", str(prune_dir))):
        path = out / f"eval-{which}.json"
        run(cli("eval", "--model", model, "--output", str(path), "--overwrite", *sets(eval_settings(a))), path, a.reuse)
        ppl = json.loads(path.read_text())["perplexity"]
        row[f"ppl_{which}"], row["eval_windows"], row["eval_note"] = ppl["perplexity"], ppl["windows"], ppl.get("note")

    export_dir = out / "export"
    run(cli("export", str(prune_dir), str(export_dir), "--overwrite"), export_dir, a.reuse)
    row["export_bytes"] = folder_bytes(export_dir)

    if pre_learn.total > limit:
        row["learn_skipped"] = f"predicted {pre_learn.total / GIB:.1f} GiB > limit {limit / GIB:.1f} GiB"
        return row
    run(cli("learn", "--config", str(ROOT / "configs/learn/smollm2_wikitext.yaml"), "--output", str(learn_dir),
            "--overwrite", *sets(learn_settings(source, prune_dir, a))), learn_dir / "report.json", a.reuse)
    report = json.loads((learn_dir / "report.json").read_text())
    row.update(learn_step_seconds=step_seconds(report), learn_peak_gib=report["memory"]["peak_rss_bytes"] / GIB,
               learn_tokens_per_second=report["history"]["logs"][-1]["tokens_per_second"],
               learn_peak_by_phase_gib=_phase_gib(report))
    return row


def _phase_gib(report: dict) -> Optional[dict[str, float]]:
    """Where the step's memory peaked (report.json ``memory.peak_rss_bytes_by_phase``): a gap between the
    predicted and the measured peak shows up in the phase that holds it."""
    peaks = report["memory"].get("peak_rss_bytes_by_phase")
    return {k: round(v / GIB, 3) for k, v in peaks.items()} if peaks else None


def add_ratios(row: dict[str, Any]) -> None:
    for step in ("prune", "learn"):
        if row.get(f"{step}_peak_gib"):
            ratio = row[f"{step}_predicted_gib"] / row[f"{step}_peak_gib"]
            row[f"{step}_ratio"] = round(ratio, 3)
            row[f"{step}_within_15pct"] = abs(ratio - 1) <= TOLERANCE


COSTS = {"prune_seconds": "prune s", "prune_peak_gib": "prune peak GiB", "learn_step_seconds": "MaskLLM step s",
         "learn_peak_gib": "MaskLLM peak GiB", "export_bytes": "export bytes"}


def power_law(points: list[tuple[float, float]]) -> Optional[tuple[float, float]]:
    """(c, k) of the least-squares fit cost = c * params^k on log-log axes; None for fewer than 2 sizes."""
    if len({x for x, _ in points}) < 2:
        return None
    xs, ys = [math.log(x) for x, _ in points], [math.log(y) for _, y in points]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    k = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return math.exp(my - k * mx), k


def fits(rows: list[dict[str, Any]]) -> dict[str, Any]:
    out = {}
    for key in COSTS:
        points = [(r["parameters"], r[key]) for r in rows if r.get(key)]
        fit = power_law(points)
        if fit is None:
            continue
        c, k = fit
        out[key] = {"c": c, "exponent": round(k, 3), "sizes": len(points),
                    **{f"at_{label}": c * params**k for label, (_, params) in EXTRAPOLATE.items()}}
    for label, (preset, _) in EXTRAPOLATE.items():  # what the predictor says for those shapes (default settings)
        dims = PRESETS[preset]
        out.setdefault("predicted", {})[label] = {
            "preset": preset, "parameters": dims.total_params(),
            "prune_peak_gib": predict_prune(dims).total / GIB,
            "learn_peak_gib": predict_learn(dims, LearnSetup(micro_batch=1)).total / GIB}
    return out


def plot(rows: list[dict[str, Any]], fitted: dict[str, Any], path: Path) -> None:
    from compressor.reporting.plots import _pyplot

    plt = _pyplot()
    keys = [k for k in COSTS if any(r.get(k) for r in rows)]
    fig, axes = plt.subplots(1, max(len(keys), 1), figsize=(4.2 * max(len(keys), 1), 4), squeeze=False)
    for ax, key in zip(axes[0], keys):
        pts = [(r["parameters"], r[key]) for r in rows if r.get(key)]
        ax.loglog(*zip(*pts), "o", label="measured")
        pred = key.replace("_peak_gib", "_predicted_gib")
        if pred != key:
            ax.loglog([r["parameters"] for r in rows], [r[pred] for r in rows], "x", label="predicted")
            extra = fitted.get("predicted", {}).values()  # the predictor at 7B and 15B shapes
            ax.loglog([p["parameters"] for p in extra], [p[key] for p in extra], "x", color="C1")
        if key in fitted:
            c, k = fitted[key]["c"], fitted[key]["exponent"]
            xs = [min(x for x, _ in pts) * 0.8, 2e10]
            ax.loglog(xs, [c * x**k for x in xs], "--", label=f"fit ~ P^{k:.2f}")
            for label, (_, params) in EXTRAPOLATE.items():
                ax.loglog([params], [c * params**k], "s", mfc="none", color="C2")
                ax.annotate(label, (params, c * params**k), textcoords="offset points", xytext=(4, -10), fontsize=8)
        ax.set_xlim(5e7, 3e10)  # out to the 7B and 15B marks
        ax.set_xlabel("parameters")
        ax.set_title(COSTS[key])
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def fmt(v: Any, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def table(rows: list[dict[str, Any]]) -> str:
    head = ("| size | params | prune s | prune peak GiB (pred / ratio) | MaskLLM step s | MaskLLM peak GiB (pred / ratio) "
            "| PPL dense | PPL 2:4 | windows | export MB |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        def peak(step: str) -> str:
            flag = "" if r.get(f"{step}_within_15pct", True) else " **>15%**"
            measured = fmt(r.get(f"{step}_peak_gib"), ".2f") if not r.get(f"{step}_skipped") else "not run"
            return f"{measured} ({r[f'{step}_predicted_gib']:.2f} / {fmt(r.get(f'{step}_ratio'), '.2f')}){flag}"
        lines.append(f"| {r['size']} | {r['parameters'] / 1e6:,.1f} M | {fmt(r.get('prune_seconds'), '.1f')} | {peak('prune')} "
                     f"| {fmt(r.get('learn_step_seconds'), '.2f')} | {peak('learn')} | {fmt(r.get('ppl_dense'), '.2f')} "
                     f"| {fmt(r.get('ppl_pruned'), '.2f')} | {r.get('eval_windows', '-')} "
                     f"| {fmt(r.get('export_bytes') and r['export_bytes'] / 1e6, ',.1f')} |")
    return "\n".join(lines)


def smoke_model(out: Path) -> Path:
    folder = out / "models" / "tiny-llama"  # beside the runs' folders: an output never lies inside its input
    if not (folder / "config.json").is_file():
        subprocess.run([sys.executable, "-m", "compressor.models.random_init", str(folder), "--preset", "tiny"],
                       check=True, cwd=ROOT)
    return folder


def available_bytes() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return float("inf")


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    ap.add_argument("--smoke", action="store_true", help="a tiny random model instead, tiny settings: the script end to end")
    ap.add_argument("--max-windows", type=int, default=None, help="quick variant: first N evaluation windows")
    ap.add_argument("--calib-windows", type=int, default=128, help="calibration windows (protocol: 128)")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--steps", type=int, default=6, help="MaskLLM steps (the step time is the median after the first)")
    ap.add_argument("--micro-batch", type=int, default=1, help="MaskLLM windows per step")
    ap.add_argument("--max-rss-gib", type=float, default=None,
                    help="skip a run predicted above this (default: 90%% of MemAvailable at the start)")
    ap.add_argument("--out", default=str(ROOT / "runs" / "bench-scale"))
    ap.add_argument("--json", default=None, help="default bench/results/scale.json (scale-smoke.json with --smoke)")
    ap.add_argument("--plot", default=None, help="default bench/results/scale.png (scale-smoke.png with --smoke)")
    ap.add_argument("--reuse", action="store_true", help="keep every step whose result is already there")
    ap.add_argument("--glibc-default-malloc", action="store_true",
                    help=f"measure with glibc's dynamic mmap threshold (default: every step runs with {MALLOC_ENV})")
    a = ap.parse_args(argv)
    if a.glibc_default_malloc:
        RUN_ENV.clear()
    suffix = "-smoke" if a.smoke else ""
    json_path = Path(a.json or ROOT / "bench" / "results" / f"scale{suffix}.json")
    plot_path = Path(a.plot or ROOT / "bench" / "results" / f"scale{suffix}.png")
    limit = a.max_rss_gib * GIB if a.max_rss_gib else 0.9 * available_bytes()
    out = Path(a.out) / ("smoke" if a.smoke else "")

    # The process baselines of this host (Python, torch, transformers, tokenizer, allocator arenas differ
    # between machines): the peaks of the tiny model's runs less its few MB of predicted terms.
    smoke = argparse.Namespace(**{**vars(a), "calib_windows": 4, "seq_len": 64, "steps": 3, "reuse": False,
                                  "max_windows": a.max_windows if a.smoke and a.max_windows else 2})
    defaults = {"prune": float(PRUNE_BASELINE), "learn": float(LEARN_BASELINE)}
    smoke_out = Path(a.out) / "smoke"
    smoke_row = measure_size("tiny-llama", str(smoke_model(smoke_out)), smoke, smoke_out / "tiny-llama", limit, defaults)
    add_ratios(smoke_row)
    baselines = dict(defaults)
    for step, base in defaults.items():
        if smoke_row.get(f"{step}_peak_gib"):
            model_part = smoke_row[f"{step}_predicted_gib"] - base / GIB
            baselines[step] = (smoke_row[f"{step}_peak_gib"] - model_part) * GIB
            smoke_row[f"{step}_baseline_measured_mib"] = round(baselines[step] / 2**20, 1)
    print("process baselines measured on this host (MiB):", {k: round(v / 2**20, 1) for k, v in baselines.items()})
    if a.smoke:
        a.calib_windows, a.seq_len, a.steps, a.max_windows = smoke.calib_windows, smoke.seq_len, smoke.steps, smoke.max_windows
        rows = [smoke_row]
    else:
        rows = []
        for name in a.sizes:
            row = measure_size(name, name, a, out / name, limit, baselines)
            add_ratios(row)
            rows.append(row)

    fitted = fits(rows)
    settings = {k: getattr(a, k) for k in ("calib_windows", "seq_len", "steps", "micro_batch", "max_windows")}
    settings["malloc_env"] = dict(RUN_ENV)
    write_results(json_path, {"protocol": "../shared/BENCHMARK.md", "settings": settings,
                              "baselines_mib": {k: round(v / 2**20, 1) for k, v in baselines.items()},
                              "baselines_source": "measured on this host: the tiny model's runs (runs/bench-scale/smoke)",
                              "results": rows, "fits": fitted})
    plot(rows, fitted, plot_path)
    print(table(rows))
    for key, f in fitted.items():
        if key != "predicted":
            print(f"{COSTS[key]}: ~ params^{f['exponent']} over {f['sizes']} sizes; "
                  + ", ".join(f"{label} {f[f'at_{label}']:.4g}" for label in EXTRAPOLATE))
    for label, p in fitted["predicted"].items():
        print(f"predicted at {label} ({p['preset']}, {p['parameters'] / 1e9:.2f} B): lazy prune peak "
              f"{p['prune_peak_gib']:.1f} GiB, MaskLLM peak {p['learn_peak_gib']:.1f} GiB")
    print(f"wrote {json_path} and {plot_path}")


if __name__ == "__main__":
    main()
