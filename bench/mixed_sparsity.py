"""Mixed sparsity (issue 16) on SmolLM2-135M under ../shared/BENCHMARK.md: uniform, OWL (tuned on calibration
KL), EvoPress-style (uniformly seeded) and MSP (Fisher-seeded) plans from one `compressor search` per setting,
each plan's perplexity over wiki.test.raw, fitness evaluations, search seconds and exact average; the
evolutionary searches with several seeds (mean +- std); and fitness scoring with 2 Ray workers against 1
(the same candidates: same numbers, and the speed ratio).

    python bench/mixed_sparsity.py                                  # every setting, 3 seeds, all 589 windows
    python bench/mixed_sparsity.py --settings sgpt70 n8_75 --seeds 0 --max-windows 64   # quick variant
    python bench/mixed_sparsity.py --speed-only --speed-run runs/bench-msp/sgpt70       # only the 2-vs-1 ratio
    python bench/mixed_sparsity.py --settings sgpt70 --prune-plans   # also each plan via `compressor prune`
    python bench/mixed_sparsity.py --smoke                          # tiny random LLaMA, in process, < 1 min

Writes bench/results/mixed_sparsity.json and bench/results/mixed_sparsity.png (fitness vs evaluations);
run folders (plans, reports, plots) under runs/bench-msp/. Finished settings are reused with --reuse.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from results_io import write_results  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SGPT70, N8 = "configs/search/msp_sparsegpt_70.yaml", "configs/search/msp_n8_75.yaml"
SETTINGS = {  # name -> (config, overrides)
    "sgpt70": (SGPT70, []),
    "sgpt60": (SGPT70, ["target=0.6", "levels={start: 0.4, stop: 0.8, step: 0.05}"]),
    "wanda70": (SGPT70, ["method=wanda"]),
    "wanda60": (SGPT70, ["method=wanda", "target=0.6", "levels={start: 0.4, stop: 0.8, step: 0.05}"]),
    "n8_75": (N8, []),
    "n8_625": (N8, ["target=0.625"]),
    "wanda_n8_75": (N8, ["method=wanda"]),
}
TARGETS = {"sgpt70": {"vs_uniform": 0.7, "vs_owl": 0.85}}  # the targets on MSP's perplexity


def run_setting(name: str, out_root: Path, seeds: list[int], max_windows, workers: int, reuse: bool,
                extra: list[str], prune_plans: bool = False) -> dict:
    config, overrides = SETTINGS[name]
    out = out_root / name
    sets = overrides + extra + [f"seeds=[{', '.join(map(str, seeds))}]", f"executor.num_cpus={workers}"]
    if max_windows:
        sets.append(f"evaluation.max_windows={max_windows}")
    finished = (out / "report.json").is_file()
    if not (reuse and finished):
        # a killed setting continues where it stopped (database entries, generations); a finished one is redone
        flag = "--resume" if (out / ".compressor-run.json").is_file() and not finished else "--overwrite"
        cmd = [sys.executable, "-m", "compressor.cli", "search", "--config", str(ROOT / config), "--output", str(out),
               "--evaluate", flag] + [a for s in sets for a in ("--set", s)]
        print("+", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True, cwd=ROOT)
    report = json.loads((out / "report.json").read_text())
    if prune_plans:
        for key, s in report["searches"].items():
            s["prune_perplexity"] = prune_plan(out / s["plan"], report["config"]["method"], out / "prune" / key,
                                               max_windows, workers, reuse)
    return summarize(name, report, out)


def prune_plan(plan: Path, method: str, out: Path, max_windows, workers: int, reuse: bool,
               extra: tuple[str, ...] = ()) -> float:
    """The plan through `compressor prune` (blocks in order, each calibrated on the pruned blocks before it),
    rather than assembled from the search's database of layers solved on dense inputs."""
    if not (reuse and (out / "report.json").is_file()):
        sets = [f"sparsity_plan={plan}", "sparsity=null", f"executor.num_cpus={workers}", "save_model=false", *extra]
        if max_windows:
            sets.append(f"evaluation.max_windows={max_windows}")
        cmd = [sys.executable, "-m", "compressor.cli", "prune", "--config", str(ROOT / "configs" / "prune" / f"{method}.yaml"),
               "--output", str(out), "--overwrite"] + [a for s in sets for a in ("--set", s)]
        print("+", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True, cwd=ROOT)
    return json.loads((out / "report.json").read_text())["perplexity"]["perplexity"]


def summarize(name: str, report: dict, out: Path) -> dict:
    rows = {}
    for key, s in report["searches"].items():
        search = key.split("-s")[0]
        rows.setdefault(search, []).append(s)
    table = {}
    for search, runs in rows.items():
        ppl = [(r.get("perplexity") or {}).get("perplexity") for r in runs]
        pruned = [r.get("prune_perplexity") for r in runs]
        fit = [r["final_fitness"] for r in runs]
        table[search] = {
            "seeds": len(runs),
            "perplexity": _stat(ppl) if None not in ppl else None,
            "prune_perplexity": _stat(pruned) if None not in pruned else None,  # the plan via compressor prune
            "fitness": _stat(fit),
            "evaluations": runs[0]["evaluations"],
            "search_seconds": _stat([r["seconds"] for r in runs]),
            "average": runs[0]["average"], "average_exact": runs[0]["average_exact"],
            "history": [r["history"] for r in runs],
        }
    checks = {}
    msp, uni, owl = (table.get(k, {}).get("perplexity") for k in ("msp", "uniform", "owl"))
    if msp and uni:
        checks["msp_vs_uniform"] = msp["mean"] / uni["mean"]
    if msp and owl:
        checks["msp_vs_owl"] = msp["mean"] / owl["mean"]
    ratios = [v["ratio"] for v in report.get("seeding", {}).values() if v["ratio"] is not None]
    checks["seeding_evaluation_ratio"] = ratios or None  # MSP's evaluations to EvoPress's final fitness / EvoPress's
    checks["averages_exact"] = all(abs(s["off_target_weights"]) <= 8 for s in report["searches"].values())
    return {"setting": name, "target": report["config"]["target"], "method": report["config"]["method"],
            "levels": report["levels"], "eval": report.get("evaluation"), "searches": table, "checks": checks,
            "targets": TARGETS.get(name), "run": str(out)}


def _stat(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "values": values}


def scoring_speed(run: Path, workers: list[int], candidates: int, windows: int, inprocess: bool = False) -> dict:
    """Score the same candidates (mutants of the uniform plan) on the same windows with each worker count,
    each in its own local Ray cluster; results must be identical, seconds are compared."""
    import numpy as np

    from compressor.config.base import load_config
    from compressor.data import calibration_windows, load_token_ids
    from compressor.execution.base import make_executor
    from compressor.models import load_model
    from compressor.models.layers import prunable_linears
    from compressor.search.config import SearchConfig
    from compressor.search.database import Database
    from compressor.search.evolution import breed
    from compressor.search.levels import SearchSpace
    from compressor.search.repair import snap
    from compressor.search.scoring import Scorer, ScoringSpec, all_tokens, final_hidden
    from compressor.sparsity.plan import layer_shapes

    cfg = load_config(SearchConfig, run / "config.yaml")
    loaded = load_model(cfg.model)
    space = SearchSpace.build(layer_shapes(prunable_linears(loaded.model, loaded.arch, cfg.targets, cfg.ignore)),
                              cfg.level_set, cfg.target)
    f = cfg.fitness
    ids = calibration_windows(load_token_ids(cfg.calibration.data, loaded.tokenizer), f.num_windows, f.seq_len, f.seed)
    hidden = final_hidden(loaded.model, ids, f.batch_size, cfg.precision) if f.kind == "kl" else None
    del loaded
    uniform = snap(space.level_positions([float(space.target)] * len(space)), space)
    pool = [uniform] + breed([uniform], space, np.random.default_rng(0), candidates - 1)
    spec = ScoringSpec(cfg.model, Database(str(run / "database"), cfg.method, cfg.level_set.levels), space.names,
                       f.kind, cfg.precision, f.batch_size)
    picks = all_tokens(windows, f.seq_len)
    out = {}
    for w in workers:
        ex_cfg = cfg.executor.model_copy(update={"kind": "inprocess" if inprocess else "ray", "num_cpus": w,
                                                 "address": None})
        with make_executor(ex_cfg) as executor:
            scorer = Scorer(executor, spec, ids, hidden, f.windows_per_job)
            scorer.score(pool[: 2 * w], picks[:1])  # warm-up: the workers load their models
            start = time.perf_counter()
            values = scorer.score(pool, picks)
            out[w] = {"seconds": time.perf_counter() - start, "fitness": values}
    same = all(out[w]["fitness"] == out[workers[0]]["fitness"] for w in workers)
    result = {"candidates": candidates, "windows": windows, "identical": same,
              "seconds": {w: out[w]["seconds"] for w in workers}, "inprocess": inprocess}
    if len(workers) == 2:
        result["speedup"] = out[workers[0]]["seconds"] / out[workers[1]]["seconds"]
    return result


def smoke(tmp: Path) -> list[dict]:
    """A tiny random LLaMA, 2 generations, in process: checks the whole path in well under a minute."""
    from compressor.models.random_init import save_random_model

    model = save_random_model(tmp / "tiny", "tiny")
    text = tmp / "text.txt"
    text.write_text((ROOT.parent / "shared/data/wikitext-2/wiki.valid.tokens").read_text()[:60_000])
    sets = [f"model.source={model}", f"calibration.data.source={text}", "calibration.num_windows=4",
            "calibration.seq_len=32", "fisher.num_windows=2", "fitness.num_windows=4", "fitness.seq_len=32",
            "fitness.final_windows=2", "evolution.generations=2", "evolution.offspring=3",
            "evolution.stages=[{tokens: 31, survivors: 2}, {tokens: 62, survivors: 1}]", "executor.kind=inprocess",
            f"evaluation.data.source={tmp / 'eval.txt'}", "evaluation.seq_len=32", "evaluation.max_windows=2"]
    (tmp / "eval.txt").write_text((ROOT.parent / "shared/data/wikitext-2/wiki.test.raw").read_text()[:20_000])
    from compressor.cli import main as cli  # in this process: the smoke test pays torch's import once

    rows = []
    for name in ("sgpt70", "wanda_n8_75"):
        config, overrides = SETTINGS[name]
        out = tmp / name
        args = ["search", "--config", str(ROOT / config), "--output", str(out), "--evaluate"]
        if cli(args + [a for s in overrides + sets for a in ("--set", s)]) != 0:
            raise SystemExit(f"the smoke search {name} failed")
        rows.append(summarize(name, json.loads((out / "report.json").read_text()), out))
    tiny = [f"model.source={model}", f"calibration.data.source={text}", "calibration.num_windows=4",
            "calibration.seq_len=32", f"evaluation.data.source={tmp / 'eval.txt'}", "evaluation.seq_len=32",
            "executor.kind=inprocess"]
    plan = tmp / "sgpt70" / "plans" / "msp-s0.yaml"
    rows[0]["msp plan via compressor prune (smoke)"] = prune_plan(plan, "sparsegpt", tmp / "prune-msp", 2, 1, False, tiny)
    rows.append({"setting": "scoring speed (smoke, in process)",
                 "speed": scoring_speed(tmp / "sgpt70", [1, 2], 3, 2, inprocess=True)})
    return rows


def print_table(rows: list[dict]) -> None:
    print(f"{'setting':12s} {'search':9s} {'perplexity':>18s} {'ppl via prune':>18s} {'KL (fixed)':>18s} {'evals':>6s} "
          f"{'seconds':>8s} {'average':>9s}")

    def pm(stat):
        return f"{stat['mean']:.2f} +- {stat['std']:.2f}" if stat else "-"

    for r in rows:
        for search, s in r.get("searches", {}).items():
            f = s["fitness"]
            print(f"{r['setting']:12s} {search:9s} {pm(s['perplexity']):>18s} {pm(s.get('prune_perplexity')):>18s} "
                  f"{f['mean']:10.4f} +- {f['std']:.3f} {s['evaluations']:6d} {s['search_seconds']['mean']:8.1f} "
                  f"{s['average']:9.6f}")
        if r.get("checks"):
            print(f"{'':12s} checks: {json.dumps(r['checks'])}")
        if r.get("speed"):
            print(f"{r['setting']}: {json.dumps(r['speed'])}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--workers", type=int, default=2, help="Ray worker CPUs of each search")
    ap.add_argument("--max-windows", type=int, default=None, help="quick variant: first N evaluation windows")
    ap.add_argument("--out", default=str(ROOT / "runs" / "bench-msp"))
    ap.add_argument("--json", default=str(ROOT / "bench" / "results" / "mixed_sparsity.json"))
    ap.add_argument("--reuse", action="store_true", help="reuse settings whose run folder holds a finished search")
    ap.add_argument("--set", dest="extra", action="append", default=[], help="extra override for every setting")
    ap.add_argument("--speed-run", default=None, help="run folder whose database the 2-vs-1 scoring uses "
                                                     "(default: the sgpt70 setting's)")
    ap.add_argument("--speed-candidates", type=int, default=8)
    ap.add_argument("--speed-windows", type=int, default=4)
    ap.add_argument("--speed-only", action="store_true")
    ap.add_argument("--prune-plans", action="store_true",
                    help="also run every plan through `compressor prune` (sequential calibration) and evaluate it")
    ap.add_argument("--smoke", action="store_true", help="tiny random model, in process (checks the script runs)")
    ap.add_argument("--keep", default=None, help="with --smoke: keep its run folders here")
    args = ap.parse_args()

    if args.smoke:
        with tempfile.TemporaryDirectory() as tmp:
            rows = smoke(Path(args.keep or tmp))
        print_table(rows)
        return
    rows = [] if args.speed_only else [run_setting(s, Path(args.out), args.seeds, args.max_windows, args.workers,
                                                   args.reuse, args.extra, args.prune_plans) for s in args.settings]
    speed_run = Path(args.speed_run or Path(args.out) / "sgpt70")
    if (speed_run / "database").is_dir():
        rows.append({"setting": "scoring speed", "run": str(speed_run),
                     "speed": scoring_speed(speed_run, [1, 2], args.speed_candidates, args.speed_windows)})
    print_table(rows)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    write_results(args.json, {"protocol": "../shared/BENCHMARK.md", "results": rows})
    _plot(rows, Path(args.json).with_suffix(".png"))
    print(f"wrote {args.json}")


def _plot(rows: list[dict], path: Path) -> None:
    from compressor.reporting.plots import plot_lines

    series = {}
    for r in rows:
        for search in ("msp", "evopress"):
            for i, history in enumerate((r.get("searches", {}).get(search) or {}).get("history", [])):
                series[f"{r['setting']} {search} #{i}"] = [(h["evaluations"], h["fitness"]) for h in history]
    if series:
        plot_lines(series, path, "Fitness (fixed calibration windows) vs evaluations", "fitness evaluations",
                   "KL to dense", logy=True)


if __name__ == "__main__":
    main()
