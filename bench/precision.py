"""float32 against bf16 on SmolLM2-135M (../shared/BENCHMARK.md): one-shot pruning and MaskLLM, each pair
run one after the other on the same machine, every perplexity evaluated in float32.

    python bench/precision.py prune                 # SparseGPT and Wanda 2:4, 589-window perplexity
    python bench/precision.py prune --max-windows 64 --rows sparsegpt
    python bench/precision.py gram                  # Gram error of each statistics setting against float64
    python bench/precision.py maskllm --prior-run runs/sgpt-mask --steps 30
    python bench/precision.py emulation             # bf16 products on a CPU without bf16 units
    python bench/precision.py payoff --prior-run runs/sgpt --steps 150   # MaskLLM for about an hour on bf16

prune: settings fp32 (compute float32, statistics float64), bf16 (compute bfloat16, statistics float64) and
bf16-stats (compute bfloat16, statistics bfloat16); columns: prune seconds (calibrate + solve), mean layer
error (against the dense model's inputs, float64), perplexity, peak RSS, ratios to fp32.
gram: the relative Frobenius error of the Gram matrices of the first blocks' real calibration inputs.
maskllm: the shipped recipe (configs/learn/smollm2_wikitext.yaml) from the same prior for --steps steps in
each precision: training tokens/s, hard-mask perplexity against tokens, peak RSS.
payoff: the issue's payoff run, MaskLLM from the SparseGPT prior on the bf16 path for --steps steps of the
shipped recipe (4,096 tokens each; size --steps to an hour of this host: 150 at 21 s per step on an
AVX512-BF16 Zen 4 host); its hard mask, the prior and the
dense model over --final-windows windows (all 589 by default), in float32; the share of the SparseGPT-to-dense
gap it closes; the curve in precision_payoff.png. --results writes elsewhere (e.g. a host's folder).
emulation: one forward + backward of the dense model under bf16 autocast, with torch's own bf16 kernels and
with EmulatedBF16Products (float32 GEMMs of bf16 operands), against float32; seconds and the loss and
gradient agreement with the native bf16 path. On bf16 hardware the native path is the one that runs.
Writes bench/results/precision.json (one entry per part) and precision_maskllm.png.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from results_io import read_results, write_results  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
WIKITEXT = ROOT.parent / "shared" / "data" / "wikitext-2"
RESULTS = ROOT / "bench" / "results" / "precision.json"
SETTINGS = {
    "fp32": ["precision.compute=float32", "precision.statistics=float64"],
    "bf16": ["precision.compute=bfloat16", "precision.statistics=float64"],
    "bf16-stats": ["precision.compute=bfloat16", "precision.statistics=bfloat16"],
}


def _run(cmd: list[str]) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)


def _save(part: str, value: dict, path: Path = RESULTS) -> None:
    results = read_results(path) or {"protocol": "../shared/BENCHMARK.md"}
    results[part] = value
    write_results(path, results)
    print(f"wrote {path} ({part})")


def prune(args) -> None:
    rows = []
    for method in args.rows:
        for setting in args.settings:
            out = Path(args.out) / f"{method}-{setting}"
            sets = SETTINGS[setting] + ["executor.kind=ray", "executor.num_cpus=2"] + args.set
            if args.max_windows:
                sets.append(f"evaluation.max_windows={args.max_windows}")
            if not (args.reuse and (out / "report.json").is_file()):
                _run([sys.executable, "-m", "compressor.cli", "prune", "--config",
                      str(ROOT / "configs" / "prune" / f"{method}.yaml"), "--output", str(out), "--overwrite"]
                     + [a for s in sets for a in ("--set", s)])
            report = json.loads((out / "report.json").read_text())
            ppl = report.get("perplexity") or {}
            rows.append({"method": method, "setting": setting, "precision": report.get("precision"),
                         "prune_seconds": report["timing"]["prune_seconds"],
                         "calibrate_seconds": report["timing"].get("calibrate"), "solve_seconds": report["timing"].get("solve"),
                         "mean_layer_error": report["summary"]["mean_layer_error"], "perplexity": ppl.get("perplexity"),
                         "eval_windows": ppl.get("windows"), "eval_dtype": "float32",
                         "peak_rss_gib": round(report["memory"]["peak_rss_bytes"] / 2**30, 3), "run": str(out)})
    for r in rows:
        base = next(b for b in rows if b["method"] == r["method"] and b["setting"] == "fp32")
        r["speedup_vs_fp32"] = round(base["prune_seconds"] / r["prune_seconds"], 2)
        r["layer_error_vs_fp32"] = round(r["mean_layer_error"] / base["mean_layer_error"], 4)
        if r["perplexity"] and base["perplexity"]:
            r["ppl_vs_fp32"] = round(r["perplexity"] / base["perplexity"], 4)
    print(f"{'method':10s} {'setting':10s} {'prune s':>8s} {'speedup':>7s} {'layer err':>9s} {'vs fp32':>7s} "
          f"{'ppl':>8s} {'vs fp32':>7s} {'RSS GiB':>7s}")
    for r in rows:
        print(f"{r['method']:10s} {r['setting']:10s} {r['prune_seconds']:8.1f} {r['speedup_vs_fp32']:7.2f} "
              f"{r['mean_layer_error']:9.4f} {r['layer_error_vs_fp32']:7.4f} {r['perplexity'] or 0:8.2f} "
              f"{r.get('ppl_vs_fp32', 0):7.4f} {r['peak_rss_gib']:7.2f}")
    _save("prune", {"eval_windows": args.max_windows or "all", "rows": rows})


def gram(args) -> None:
    """Gram matrices of real calibration inputs (the first blocks of the dense model), batch by batch as
    the pipeline forms them: float32 or bf16 products summed in float64, against float64 products."""
    import torch

    from compressor.calibration import capture_block_inputs, run_block
    from compressor.calibration.stats import InputStats
    from compressor.data import calibration_windows, load_token_ids
    from compressor.models import load_model
    from compressor.models.layers import decoder_blocks

    loaded = load_model("smollm2-135m")
    tokens = load_token_ids(str(WIKITEXT / "wiki.valid.tokens"), loaded.tokenizer)
    inputs = capture_block_inputs(loaded.model, loaded.arch, calibration_windows(tokens, args.windows, 512, 0), 8)
    dtypes = {"float64 products": torch.float64, "float32 products (statistics: float64)": torch.float32,
              "bf16 products (statistics: bfloat16)": torch.bfloat16}
    rows = []
    for k, block in enumerate(decoder_blocks(loaded.model, loaded.arch)[: args.blocks]):
        stats = {}
        hooks = []
        for g in loaded.arch.input_groups:
            linear = block.get_submodule(g.linears[0])
            stats[g.name] = {n: InputStats.empty("gram", linear.in_features, d) for n, d in dtypes.items()}

            def hook(module, a, _s=stats[g.name]):
                for st in _s.values():
                    st.add(a[0].double() if st.product_dtype == torch.float64 else a[0])

            hooks.append(linear.register_forward_pre_hook(hook))
        inputs = run_block(block, inputs)
        for h in hooks:
            h.remove()
        for group, by in stats.items():
            exact = by["float64 products"].gram
            for name, st in by.items():
                if st.product_dtype != torch.float64:
                    rows.append({"block": k, "group": group, "setting": name,
                                 "relative_error": float((st.gram - exact).norm() / exact.norm())})
    summary = {}
    for r in rows:
        summary.setdefault(r["setting"], []).append(r["relative_error"])
    summary = {s: {"median": sorted(v)[len(v) // 2], "max": max(v)} for s, v in summary.items()}
    for setting, e in summary.items():
        print(f"{setting:40s} Gram relative error vs float64: median {e['median']:.2e}, max {e['max']:.2e}")
    _save("gram", {"windows": args.windows, "blocks": args.blocks, "rows": rows, "summary": summary})


def _learn_row(report: dict) -> dict:
    logs = report["history"]["logs"]
    steady = logs[1:] or logs  # the first window includes warm-up
    return {"tokens_per_second": sum(r["tokens_per_second"] for r in steady) / len(steady),
            "seconds_per_step": sum(r["seconds_per_step"] for r in steady) / len(steady),
            "curve": [(e["tokens"], e["perplexity"]) for e in report["history"]["evals"]],
            "final_perplexity": report["history"]["evals"][-1]["perplexity"],
            "eval_windows": report["config"]["evaluation"]["max_windows"],
            "peak_rss_gib": round(report["memory"]["peak_rss_bytes"] / 2**30, 3)}


def maskllm(args) -> None:
    rows = {}
    config = ROOT / "configs" / "learn" / "smollm2_wikitext.yaml"
    for setting in ("fp32", "bf16"):
        out = Path(args.out) / f"maskllm-{setting}"
        sets = [SETTINGS[setting][0], f"train.steps={args.steps}", f"train.eval_every={args.eval_every}",
                f"train.log_every={args.log_every}", "prior.kind=file", f"prior.path={args.prior_run}"] + args.set
        if not (args.reuse and (out / "report.json").is_file()):
            _run([sys.executable, "-m", "compressor.cli", "learn", "--config", str(config), "--output", str(out),
                  "--overwrite"] + [a for s in sets for a in ("--set", s)])
        rows[setting] = {**_learn_row(json.loads((out / "report.json").read_text())), "run": str(out)}
    rows["bf16"]["tokens_per_second_vs_fp32"] = round(rows["bf16"]["tokens_per_second"] / rows["fp32"]["tokens_per_second"], 2)
    rows["bf16"]["perplexity_vs_fp32"] = round(rows["bf16"]["final_perplexity"] / rows["fp32"]["final_perplexity"], 4)
    for setting, r in rows.items():
        print(f"{setting:5s} {r['tokens_per_second']:8.1f} tokens/s  ppl {r['final_perplexity']:.2f} "
              f"({r['eval_windows']} windows)  RSS {r['peak_rss_gib']:.2f} GiB")
    from compressor.reporting.plots import plot_lines

    plot_lines({s: r["curve"] for s, r in rows.items()}, RESULTS.with_name("precision_maskllm.png"),
               "MaskLLM hard-mask perplexity, float32 vs bf16 path", "training tokens", "perplexity (float32 eval)",
               logy=True)
    _save("maskllm", {"steps": args.steps, "prior_run": args.prior_run, "rows": rows})


def payoff(args) -> None:
    out = Path(args.out)
    run = out / "maskllm-payoff"
    sets = [SETTINGS["bf16"][0], f"train.steps={args.steps}", f"train.eval_every={args.eval_every}",
            "prior.kind=file", f"prior.path={args.prior_run}"] + args.set
    if not (args.reuse and (run / "report.json").is_file()):
        _run([sys.executable, "-m", "compressor.cli", "learn", "--config",
              str(ROOT / "configs" / "learn" / "smollm2_wikitext.yaml"), "--output", str(run), "--overwrite"]
             + [a for s in sets for a in ("--set", s)])
    report = json.loads((run / "report.json").read_text())
    row = _learn_row(report)
    windows = args.final_windows or "all"
    final: dict[str, dict] = {}
    for label, model in (("dense", "smollm2-135m"), ("sparsegpt", args.prior_run), ("maskllm", str(run))):
        path = out / f"eval-{label}-{windows}.json"
        if not (args.reuse and path.is_file()):
            _run([sys.executable, "-m", "compressor.cli", "eval", "--model", model, "--output", str(path), "--overwrite",
                  "--set", f"evaluation.data.source={WIKITEXT / 'wiki.test.raw'}",
                  "--set", f"evaluation.max_windows={args.final_windows or 'null'}"])
        final[label] = json.loads(path.read_text())["perplexity"]
    ppl = {k: v["perplexity"] for k, v in final.items()}
    closed = (ppl["sparsegpt"] - ppl["maskllm"]) / (ppl["sparsegpt"] - ppl["dense"])
    tokens = row["curve"][-1][0]
    result = {"steps": args.steps, "prior_run": args.prior_run, "tokens": tokens,
              "train_seconds": report["timing"].get("optimizer steps"),
              "train_wall_seconds": report["timing"].get("train"), **row,  # with the curve's evaluations
              "precision": report.get("precision"), "final": final, "gap_closed": round(closed, 4),
              "target_gap_closed": 0.7, "run": str(run)}
    print(f"MaskLLM bf16, {tokens} tokens at {row['tokens_per_second']:.0f} tokens/s: ppl {ppl['maskllm']:.2f} over "
          f"{final['maskllm']['windows']} windows (SparseGPT {ppl['sparsegpt']:.2f}, dense {ppl['dense']:.2f}): "
          f"{100 * closed:.1f}% of the gap closed (target 70%)")
    from compressor.reporting.plots import plot_lines

    results = Path(args.results) if args.results else RESULTS
    n, target = final["maskllm"]["windows"], ppl["dense"] + 0.3 * (ppl["sparsegpt"] - ppl["dense"])
    flat = lambda y: [(0, y), (tokens, y)]  # noqa: E731
    plot_lines({f"MaskLLM hard mask, first {row['eval_windows']} windows": row["curve"],
                f"MaskLLM hard mask, {n} windows": [(tokens, ppl["maskllm"])],
                f"SparseGPT 2:4, {n} windows": flat(ppl["sparsegpt"]), f"dense, {n} windows": flat(ppl["dense"]),
                "70% of the gap closed": flat(target)},
               results.with_name("precision_payoff.png"), "MaskLLM from the SparseGPT prior, bf16 path",
               "training tokens", "hard-mask perplexity (float32 eval)", logy=True)
    _save("payoff", result, results)


def emulation(args) -> None:
    import time
    from contextlib import nullcontext

    import torch

    from compressor.models import load_model
    from compressor.precision import EmulatedBF16Products, bf16_hardware

    loaded = load_model("smollm2-135m")
    model = loaded.model
    text = (WIKITEXT / "wiki.valid.tokens").read_text()[: 50 * args.batch * args.seq_len]
    ids = torch.tensor(loaded.tokenizer(text, add_special_tokens=False)["input_ids"][: args.batch * args.seq_len])
    ids = ids.reshape(args.batch, args.seq_len)
    paths = {"float32": (False, nullcontext), "bf16 (torch kernels)": (True, nullcontext),
             "bf16 (emulated: float32 GEMMs of bf16 operands)": (True, EmulatedBF16Products)}
    rows, grads = [], {}
    for name, (bf16, context) in paths.items():
        seconds = []
        for _ in range(args.repeats if "torch kernels" not in name else 1):
            model.zero_grad(set_to_none=True)
            start = time.perf_counter()
            with context():
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    loss = model(input_ids=ids, labels=ids, use_cache=False).loss.float()
                loss.backward()
            seconds.append(time.perf_counter() - start)
            print(f"{name}: {seconds[-1]:.2f} s, loss {loss.item():.5f}", flush=True)
        grads[name] = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        rows.append({"path": name, "seconds": min(seconds), "runs": len(seconds), "loss": loss.item(),
                     "tokens_per_s": ids.numel() / min(seconds)})
    native, emulated = grads[list(paths)[1]], grads[list(paths)[2]]
    for row in rows:
        row["speed_vs_float32"] = rows[0]["seconds"] / row["seconds"]
    result = {"model": "smollm2-135m", "tokens": list(ids.shape), "bf16_hardware": bf16_hardware(), "rows": rows,
              "emulated_vs_native": {"loss_rel": abs(rows[2]["loss"] - rows[1]["loss"]) / rows[1]["loss"],
                                     "grad_cosine": float(torch.nn.functional.cosine_similarity(native.double(), emulated.double(), dim=0)),
                                     "grad_rel": float((emulated - native).norm() / native.norm())}}
    print(json.dumps(result, indent=2))
    _save("emulation", result)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="part", required=True)
    p = sub.add_parser("prune")
    p.add_argument("--rows", nargs="+", default=["sparsegpt", "wanda"], choices=["sparsegpt", "wanda", "magnitude"])
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    p.add_argument("--max-windows", type=int)
    p.add_argument("--out", default=str(ROOT / "runs" / "bench-precision"))
    p.add_argument("--reuse", action="store_true")
    p.add_argument("--set", action="append", default=[])
    p = sub.add_parser("gram")
    p.add_argument("--windows", type=int, default=32)
    p.add_argument("--blocks", type=int, default=4)
    p = sub.add_parser("maskllm")
    p.add_argument("--prior-run", required=True)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--log-every", type=int, default=5)
    p.add_argument("--out", default=str(ROOT / "runs" / "bench-precision"))
    p.add_argument("--reuse", action="store_true")
    p.add_argument("--set", action="append", default=[])
    p = sub.add_parser("payoff")
    p.add_argument("--prior-run", required=True, help="a SparseGPT 2:4 prune run folder (its masks are the prior)")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--eval-every", type=int, default=30)
    p.add_argument("--final-windows", type=int, help="first N windows of wiki.test.raw (default: all)")
    p.add_argument("--out", default=str(ROOT / "runs" / "bench-precision"))
    p.add_argument("--results", help=f"results JSON (default {RESULTS.relative_to(ROOT)})")
    p.add_argument("--reuse", action="store_true")
    p.add_argument("--set", action="append", default=[])
    p = sub.add_parser("emulation")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3, help="runs of the float32 and emulated paths (best kept)")
    args = ap.parse_args()
    {"prune": prune, "gram": gram, "maskllm": maskllm, "payoff": payoff, "emulation": emulation}[args.part](args)


if __name__ == "__main__":
    main()
