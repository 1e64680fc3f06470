"""MaskLLM 2:4 on SmolLM2-135M (../shared/BENCHMARK.md data): perplexity of the hard mask against
training tokens, tokens/s, step time against a plain forward+backward of the frozen dense model, memory.

    compressor prune --config configs/prune/sparsegpt.yaml --output runs/sgpt-mask \
        --set sparsegpt.update_weights=false --set evaluation.max_windows=32
    python bench/maskllm.py --prior-run runs/sgpt-mask --steps 60 --grad-accum 2 --set maskllm.logits_lr=5e-4
Rows: learned from the SparseGPT prior (a `compressor prune` run folder; with update_weights false its
model is the prior mask on the frozen weights, the fair starting point), and from no prior.
Prints a table, writes bench/results/maskllm.json and bench/results/maskllm_ppl.png.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from results_io import read_results, write_results  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "learn" / "smollm2_wikitext.yaml"


def plain_pass(model, ids) -> float:
    """Seconds of one forward + backward of the dense model with frozen weights (gradients reach only
    the input embeddings): the yardstick for the masked step."""
    start = time.perf_counter()
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    model(inputs_embeds=embeds, labels=ids).loss.backward()
    return time.perf_counter() - start


def frozen_model_and_batch(seq_len: int, batch: int):
    import torch

    from compressor.models import load_model

    loaded = load_model("smollm2-135m")
    for p in loaded.model.parameters():
        p.requires_grad_(False)
    ids = torch.randint(0, loaded.model.config.vocab_size, (batch, seq_len), generator=torch.Generator().manual_seed(0))
    return loaded, ids


def plain_step_seconds(seq_len: int, batch: int, repeats: int = 3) -> float:
    """Median seconds of ``plain_pass`` after a warm-up."""
    import statistics

    loaded, ids = frozen_model_and_batch(seq_len, batch)
    plain_pass(loaded.model, ids)
    return statistics.median(plain_pass(loaded.model, ids) for _ in range(repeats))


def step_ratio(seq_len: int, batch: int, accums: list[int], repeats: int = 3) -> dict:
    """In one process: a plain forward+backward of the dense model with frozen weights (gradients reach
    only the input embeddings) against a mask step (hold one sample, k masked micro-batches, one
    surrogate backward, AdamW), for each k in ``accums``. Each repeat times a plain pass right before
    each mask step, and the ratio is the median over repeats of step / (k x that plain pass), so a
    machine whose speed drifts (shared hosts) does not bias it. Also the parts of a step, medians."""
    import statistics

    from compressor.methods.maskllm import (
        MaskLLMConfig, attach_masks, hold_samples, mask_train, set_schedule_state, step_surrogate,
    )
    from compressor.models.layers import prunable_linears
    from compressor.training.backends import adamw

    loaded, ids = frozen_model_and_batch(seq_len, batch)
    model = loaded.model
    dense = frozen_model_and_batch(seq_len, batch)[0].model  # a twin without masks for the plain passes
    plain_pass(dense, ids)  # warm-up
    names = [t.name for t in prunable_linears(model, loaded.arch, [".*"], [])]
    masks = attach_masks(model, names, MaskLLMConfig())
    mask_train(masks, True)
    set_schedule_state(masks, 4.0, 100.0)
    optimizer = adamw([{"params": [m.logits for m in masks.values()], "lr": 1e-4}])
    parts: dict[str, list[float]] = {"hold_sample": [], "masked_micro_batch": [], "surrogate_backward": [],
                                     "optimizer": []}

    def step(k: int) -> float:
        t0 = time.perf_counter()
        hold_samples(model, masks)
        t1 = time.perf_counter()
        for _ in range(k):
            (model(input_ids=ids, labels=ids, use_cache=False).loss / k).backward()
        t2 = time.perf_counter()
        step_surrogate(masks, 1e-5).backward()
        t3 = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        t4 = time.perf_counter()
        for key, value in zip(parts, (t1 - t0, (t2 - t1) / k, t3 - t2, t4 - t3)):
            parts[key].append(value)
        return t4 - t0

    step(1)  # warm-up
    for values in parts.values():
        values.clear()
    plains: list[float] = []
    ratios: dict[int, list[float]] = {k: [] for k in accums}
    for _ in range(repeats):
        for k in accums:
            plains.append(plain_pass(dense, ids))
            ratios[k].append(step(k) / (k * plains[-1]))
    plain_s = statistics.median(plains)
    masked_micro = statistics.median(parts["masked_micro_batch"])
    return {"repeats": repeats, "plain_fwd_bwd_seconds": round(plain_s, 3),
            "ratios": {str(k): round(statistics.median(v), 3) for k, v in ratios.items()},
            "parts_seconds": {k: round(statistics.median(v), 3) for k, v in parts.items()},
            "masked_micro_vs_plain": round(masked_micro / plain_s, 3)}


def run_row(name: str, out: Path, sets: list[str], reuse: bool = False) -> dict:
    if reuse and (out / "report.json").is_file():
        print(f"reusing the finished run {out}", flush=True)
        return json.loads((out / "report.json").read_text())
    cmd = [sys.executable, "-m", "compressor.cli", "learn", "--config", str(CONFIG), "--output", str(out), "--overwrite"]
    cmd += [a for s in sets for a in ("--set", s)]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT, env={**os.environ, "RAY_AUTH_MODE": "disabled"})
    return json.loads((out / "report.json").read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prior-run", help="a `compressor prune --config configs/prune/sparsegpt.yaml` run")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--micro-batch", type=int, default=2)
    ap.add_argument("--grad-accum", type=int, default=2)
    ap.add_argument("--set", dest="sets", action="append", default=[], help="extra config override for every row")
    ap.add_argument("--sparsegpt-run", help="a SparseGPT run with updated weights: the gap to close is its ppl vs dense")
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--eval-windows", type=int, default=32, help="quick variant of the perplexity (first N windows)")
    ap.add_argument("--rows", nargs="+", default=["sparsegpt-prior", "no-prior"])
    ap.add_argument("--reuse", action="store_true", help="take a row's finished run (its report.json) as it is, "
                    "e.g. one finished with `compressor learn --resume` after an interruption")
    ap.add_argument("--out", default=str(ROOT / "runs" / "bench-maskllm"))
    ap.add_argument("--ratio-only", nargs="*", type=int, metavar="K",
                    help="only measure the step time against plain forward+backward for K micro-batches per step")
    args = ap.parse_args()
    if args.ratio_only is not None:
        ratio = step_ratio(args.seq_len, args.micro_batch, args.ratio_only or [1, 2, 4, 8])
        print(json.dumps(ratio, indent=2))
        path = ROOT / "bench" / "results" / "maskllm.json"
        results = read_results(path)
        default = (args.seq_len, args.micro_batch) == (ap.get_default("seq_len"), ap.get_default("micro_batch"))
        key = "step_ratio" if default else f"step_ratio_seq{args.seq_len}_mb{args.micro_batch}"
        results[key] = {"seq_len": args.seq_len, "micro_batch": args.micro_batch, **ratio}
        write_results(path, results)
        return
    if not args.prior_run:
        ap.error("--prior-run is required (a `compressor prune` run folder whose masks start the logits)")

    common = [f"train.steps={args.steps}", f"train.seq_len={args.seq_len}", f"train.micro_batch_size={args.micro_batch}",
              f"train.grad_accum={args.grad_accum}", *args.sets,
              f"train.eval_every={args.eval_every}", f"train.checkpoint_every={args.eval_every}",
              f"evaluation.max_windows={args.eval_windows}"]
    priors = {"sparsegpt-prior": ["prior.kind=file", f"prior.path={args.prior_run}"], "no-prior": ["prior.kind=none"]}
    prior_report = json.loads((Path(args.prior_run) / "report.json").read_text())
    results = {}
    for row in args.rows:
        report = run_row(row, Path(args.out) / row, common + priors[row], args.reuse)
        logs = report["history"]["logs"]
        steady = logs[1:] or logs  # the first window includes warm-up
        results[row] = {
            "evals": report["history"]["evals"],
            "final_perplexity": report["perplexity"],
            "tokens_per_second": sum(r["tokens_per_second"] for r in steady) / len(steady),
            "seconds_per_step": sum(r["seconds_per_step"] for r in steady) / len(steady),
            "train_seconds": report["timing"].get("train"),
            "tokens": logs[-1]["tokens"],
            "peak_rss_gib": round(report["memory"]["peak_rss_bytes"] / 2**30, 3),
            "memory_per_masked_weight": report["memory_per_masked_weight"],
        }
    plain = plain_step_seconds(args.seq_len, args.micro_batch)
    for r in results.values():
        # a step runs grad_accum micro-batches; the yardstick is as many plain forward+backward passes
        r["step_time_vs_plain_fwd_bwd"] = round(r["seconds_per_step"] / (plain * args.grad_accum), 3)
    json_path = ROOT / "bench" / "results" / "maskllm.json"
    earlier = json.loads(json_path.read_text()) if json_path.is_file() else {}
    results = {**{k: v for k, v in earlier.get("rows", {}).items() if k not in results}, **results}  # rows not re-run stay

    # the prior's and the dense model's perplexity on the same quick-variant windows
    from compressor.config.base import validate_config
    from compressor.runs.evaluate import EvalRunConfig, run_eval

    def quick_ppl(source: str) -> float:
        cfg = validate_config(EvalRunConfig, {"model": {"source": source}, "evaluation": {
            "data": {"source": "../shared/data/wikitext-2/wiki.test.raw"}, "max_windows": args.eval_windows}})
        return run_eval(cfg)["perplexity"]["perplexity"]

    dense, prior = quick_ppl("smollm2-135m"), quick_ppl(str(Path(args.prior_run) / "model"))
    prior_kind = ("prior mask on frozen weights" if not prior_report.get("config", {}).get("sparsegpt", {})
                  .get("update_weights", True) else "prior run (weights updated)")
    target = quick_ppl(str(Path(args.sparsegpt_run) / "model")) if args.sparsegpt_run else prior
    print(f"\nquick variant: first {args.eval_windows} windows of wiki.test.raw; dense {dense:.2f}, "
          f"{prior_kind} {prior:.2f}, SparseGPT 2:4 {target:.2f}; plain fwd+bwd {plain:.2f} s/micro-batch")
    print(f"{'row':16s} {'tokens':>8s} {'ppl':>9s} {'vs prior':>8s} {'gap closed':>10s} {'tok/s':>7s} "
          f"{'step/plain':>10s} {'RSS GiB':>7s}")
    for row, r in results.items():
        ppl = r["final_perplexity"]["perplexity"]
        r["ppl_vs_prior"] = round(ppl / prior, 4)
        r["gap_closed_vs_sparsegpt"] = round((target - ppl) / (target - dense), 4)
        print(f"{row:16s} {r['tokens']:8d} {ppl:9.2f} {r['ppl_vs_prior']:8.3f} {r['gap_closed_vs_sparsegpt']:10.3f} "
              f"{r['tokens_per_second']:7.1f} {r['step_time_vs_plain_fwd_bwd']:10.2f} {r['peak_rss_gib']:7.2f}")
    from compressor.reporting.plots import plot_lines

    series = {row: [(e["tokens"], e["perplexity"]) for e in r["evals"]] for row, r in results.items()}
    end = max(r["tokens"] for r in results.values())
    series["dense"] = [(0, dense), (end, dense)]
    series[prior_kind] = [(0, prior), (end, prior)]
    plot_lines(series, ROOT / "bench" / "results" / "maskllm_ppl.png", "MaskLLM 2:4 on SmolLM2-135M",
               "training tokens", f"perplexity (first {args.eval_windows} windows)", logy=True)
    out = {"protocol": "../shared/BENCHMARK.md (quick-variant perplexity)", "dense_perplexity": dense,
           "prior_perplexity": prior, "prior_kind": prior_kind, "sparsegpt_perplexity": target,
           "plain_fwd_bwd_seconds": plain, "settings": vars(args), "rows": results,
           "prior_run": args.prior_run, "prior_report_perplexity": prior_report.get("perplexity")}
    out.update({k: v for k, v in earlier.items() if k.startswith("step_ratio")})  # measured on their own (--ratio-only)
    if "full_eval_589_windows" in earlier:
        out["full_eval_589_windows"] = earlier["full_eval_589_windows"]  # measured with `compressor eval`
    write_results(json_path, out)


if __name__ == "__main__":
    main()
