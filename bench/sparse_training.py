"""Sparse training 2:4 on SmolLM2-135M (issue 17; protocol of ../shared/BENCHMARK.md): every arm trains on
the same tokens of corpus:train, in the same order, with the same seed and budget, and is scored over all
589 windows of wiki.test.raw (float32).

Arms (each a `compressor learn` run in its own process, after one `compressor prune` for SparseGPT):
    sparsegpt        SparseGPT 2:4 one-shot, weights updated (no training)
    fixed_mask       SparseGPT's mask, its kept weights fine-tuned
    srste            SR-STE from SparseGPT's weights
    pdp_dense        PDP from the dense model
    pdp_sparsegpt    PDP from SparseGPT's weights
    bdwp             BDWP from SparseGPT's weights (the start of SR-STE, which it is compared with)
    maskllm          MaskLLM, dense weights frozen, logits from SparseGPT's mask
    maskllm_weights  MaskLLM with weight updates (maskllm.train_weights), the same start
    dense            dense fine-tune from the dense model: the control for what the data alone does

Columns: perplexity (all windows), tokens/s (median over the training log windows after the first),
peak RSS of the arm's process, analytic linear-GEMM FLOPs of the forward and backward passes against
dense training, and the mask's change against its own start and against SparseGPT's mask (fractions
of weights). The curve of every arm's quick-variant perplexity (first --eval-windows windows) against
training tokens goes into one PNG.

    python bench/sparse_training.py --steps 300        # the full benchmark (a quiet machine; hours on CPU)
    python bench/sparse_training.py --arms srste bdwp --reuse   # re-run two arms, keep the finished others

Extra `--set KEY=VALUE` overrides apply to every training arm (e.g. a precision setting). Writes
bench/results/sparse_training.json and bench/results/sparse_training_ppl.png (--results elsewhere).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any, Optional

import yaml
from results_io import write_results  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "wikitext-2"
ARMS = ["sparsegpt", "fixed_mask", "srste", "pdp_dense", "pdp_sparsegpt", "bdwp", "maskllm", "maskllm_weights",
        "dense", "fixed_mask_distill"]


def arm_config(arm: str, args: argparse.Namespace, sgpt: Path) -> dict[str, Any]:
    """The `compressor learn` config of a training arm: the shared budget plus the arm's method and start."""
    dense_source, sgpt_model = args.model, str(sgpt / "model")
    cfg: dict[str, Any] = {
        "model": {"source": dense_source},
        "train": {"data": {"source": args.train_data}, "seq_len": args.seq_len, "micro_batch_size": args.micro_batch,
                  "grad_accum": args.grad_accum, "steps": args.steps, "seed": args.seed,
                  "shuffle_buffer": args.shuffle_buffer, "log_every": args.log_every,
                  "eval_every": args.eval_every, "checkpoint_every": args.eval_every},
        "evaluation": {"data": {"source": str(DATA / "wiki.test.raw")}, "seq_len": 512,
                       "max_windows": args.eval_windows},
    }
    lr = {"lr": args.lr}
    prior_file = {"kind": "file", "path": str(sgpt)}
    methods: dict[str, dict[str, Any]] = {
        "fixed_mask": {"model": sgpt_model, "method": {"kind": "fixed_mask", **lr}, "prior": prior_file},
        "srste": {"model": sgpt_model, "method": {"kind": "srste", **lr}},
        "pdp_dense": {"model": dense_source, "method": {"kind": "pdp", **lr}},
        "pdp_sparsegpt": {"model": sgpt_model, "method": {"kind": "pdp", "ramp_fraction": 0.0, **lr}},
        "bdwp": {"model": sgpt_model, "method": {"kind": "bdwp", **lr}},
        "maskllm": {"model": dense_source, "method": {"kind": "maskllm"}, "prior": prior_file,
                    "maskllm": {"prior_strength": 6.0, "logits_lr": args.logits_lr}},
        "maskllm_weights": {"model": dense_source, "method": {"kind": "maskllm"}, "prior": prior_file,
                            "maskllm": {"prior_strength": 6.0, "logits_lr": args.logits_lr, "train_weights": True,
                                        "weight_lr": args.lr}},
        "dense": {"model": dense_source, "method": {"kind": "dense", **lr}},
        # issue 20: the same fine-tune taught by the dense model (KL to its logits alone, T = 1)
        "fixed_mask_distill": {"model": sgpt_model, "method": {"kind": "fixed_mask", **lr}, "prior": prior_file,
                               "distill": {"weight": 1.0, "temperature": 1.0, "teacher": dense_source}},
    }
    spec = methods[arm]
    cfg["model"]["source"] = spec.pop("model")
    cfg.update(spec)
    return cfg


def run(cmd: list[str]) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT, env={**os.environ, "RAY_AUTH_MODE": "disabled"})


def finished(out: Path, reuse: bool) -> Optional[dict]:
    if reuse and (out / "report.json").is_file():
        print(f"reusing the finished run {out}", flush=True)
        return json.loads((out / "report.json").read_text())
    return None


def one_shot(args: argparse.Namespace, out: Path) -> dict:
    """SparseGPT 2:4 with weight updates, calibrated on wiki.valid.tokens as the protocol says."""
    report = finished(out, args.reuse)
    if report is None:
        run([sys.executable, "-m", "compressor.cli", "prune", "--config", str(ROOT / "configs/prune/sparsegpt.yaml"),
             "--output", str(out), "--overwrite", "--set", f"model.source={args.model}",
             "--set", f"calibration.num_windows={args.calib_windows}", "--set", "evaluation.enabled=false",
             "--set", "layer_error=false", "--set", f"executor.kind={args.prune_executor}"])
        report = json.loads((out / "report.json").read_text())
    return report


def train_arm(arm: str, args: argparse.Namespace, sgpt: Path, out: Path) -> dict:
    report = finished(out, args.reuse)
    if report is None:
        out.parent.mkdir(parents=True, exist_ok=True)
        config = out.parent / f"{arm}.yaml"
        config.write_text(yaml.safe_dump(arm_config(arm, args, sgpt), sort_keys=False))
        cmd = [sys.executable, "-m", "compressor.cli", "learn", "--config", str(config), "--output", str(out),
               "--overwrite"]
        run(cmd + [a for s in args.sets for a in ("--set", s)])
        report = json.loads((out / "report.json").read_text())
    return report


def perplexity(source: str, windows: Optional[int]) -> dict:
    from compressor.config.base import validate_config
    from compressor.runs.evaluate import EvalRunConfig, run_eval

    cfg = validate_config(EvalRunConfig, {"model": {"source": source}, "evaluation": {
        "data": {"source": str(DATA / "wiki.test.raw")}, "seq_len": 512, "max_windows": windows}})
    return run_eval(cfg)["perplexity"]


def own_final(run: Path, windows: Optional[int]) -> Optional[dict]:
    """The run's own final evaluation when it scored the same windows of wiki.test.raw (float32)."""
    if windows is None:  # a run's own evaluation is its quick variant: all 589 windows are always redone
        return None
    report = json.loads((run / "report.json").read_text())
    ppl, ev = report.get("perplexity") or {}, report["config"]["evaluation"]
    if (ppl.get("windows") == windows and Path(ev["data"]["source"]).name == "wiki.test.raw" and ev["seq_len"] == 512
            and ev["dtype"] == "float32"):
        return ppl
    return None


def mask_change(a_path: Path, b_path: Path) -> Optional[float]:
    """Fraction of weights whose mask bit differs between two masks files."""
    from compressor.checkpoints.masks import load_masks

    if not (a_path.is_file() and b_path.is_file()):
        return None
    a, b = load_masks(a_path), load_masks(b_path)
    changed = sum(int((a[n] != b[n]).sum()) for n in a)
    return changed / sum(m.numel() for m in a.values())


def row_of(arm: str, report: dict, sgpt: Path, out: Path) -> dict:
    logs = report["history"]["logs"]
    steady = logs[1:] or logs  # the first window includes warm-up
    flops = report["flops_per_micro_batch"]
    return {"tokens": logs[-1]["tokens"] if logs else 0,
            "tokens_per_second": statistics.median(r["tokens_per_second"] for r in steady) if steady else None,
            "peak_rss_gib": round(report["memory"]["peak_rss_bytes"] / 2**30, 3),
            "forward_flops_vs_dense": flops["forward_vs_dense"], "backward_flops_vs_dense": flops["backward_vs_dense"],
            "mask_change_vs_start": report.get("mask_change_vs_start"),
            "mask_change_vs_sparsegpt": mask_change(sgpt / "masks.safetensors", out / "masks.safetensors"),
            "train_seconds": report["timing"].get("train"), "evals": report["history"]["evals"]}


# Settings that do not change what an arm measures (which arms run, where runs and results go).
NOT_MEASURED = ("arms", "reuse", "keep_rows", "out", "results")


def kept_rows(path: Path, args: argparse.Namespace, refs: dict) -> dict[str, dict]:
    """The earlier results' rows of arms not run now, when every measured setting and both references
    (dense and SparseGPT perplexity) are the same; else nothing, and why."""
    if not path.is_file():
        return {}
    before = json.loads(path.read_text())
    now = {k: v for k, v in vars(args).items() if k not in NOT_MEASURED}
    then = {k: v for k, v in before["settings"].items() if k not in NOT_MEASURED}
    same_refs = all(before[f"{k}_perplexity"]["perplexity"] == refs[k]["perplexity"] for k in ("dense", "sparsegpt"))
    if now != then or not same_refs:
        differ = sorted(k for k in now.keys() | then.keys() if now.get(k) != then.get(k))
        print(f"--keep-rows: {path} was made with other settings ({', '.join(differ) or 'the references'}); "
              "its rows are not kept")
        return {}
    return {arm: row for arm, row in before["rows"].items() if arm not in args.arms}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--arms", nargs="+", default=ARMS, choices=ARMS)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--grad-accum", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shuffle-buffer", type=int, default=256, help="windows; the same buffer and seed for every arm")
    ap.add_argument("--lr", type=float, default=5e-5, help="AdamW learning rate of trained weights (every arm)")
    ap.add_argument("--logits-lr", type=float, default=1e-3, help="MaskLLM's logits learning rate")
    ap.add_argument("--train-data", default="corpus:train", help="never the evaluation file")
    ap.add_argument("--calib-windows", type=int, default=128, help="SparseGPT calibration windows of wiki.valid.tokens")
    ap.add_argument("--prune-executor", choices=["ray", "inprocess"], default="ray", help="where SparseGPT's jobs run")
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--eval-every", type=int, default=50, help="steps between points of the perplexity curve")
    ap.add_argument("--eval-windows", type=int, default=32, help="the curve's quick variant: first N windows")
    ap.add_argument("--final-windows", type=int, default=0, help="windows of the final score; 0: all (589)")
    ap.add_argument("--set", dest="sets", action="append", default=[], help="override for every training arm")
    ap.add_argument("--reuse", action="store_true", help="keep an arm's finished run (its report.json) as it is")
    ap.add_argument("--keep-rows", action="store_true",
                    help="keep the rows of arms not run now from the results JSON, when it was made with the same "
                         "settings (all but --arms): add arms to a table without running the others again")
    ap.add_argument("--out", default=str(ROOT / "runs" / "bench-sparse-training"))
    ap.add_argument("--results", default=str(ROOT / "bench" / "results"), help="folder of the JSON and the PNG")
    args = ap.parse_args()
    if "corpus:" not in args.train_data and Path(args.train_data).resolve() == (DATA / "wiki.test.raw").resolve():
        ap.error("--train-data is the evaluation file")
    out, results_dir = Path(args.out), Path(args.results)
    sgpt = out / "sparsegpt"
    final_windows = args.final_windows or None

    sgpt_report = one_shot(args, sgpt)
    rows: dict[str, dict] = {}
    for arm in args.arms:
        if arm == "sparsegpt":
            continue
        report = train_arm(arm, args, sgpt, out / arm)
        rows[arm] = row_of(arm, report, sgpt, out / arm)
    # the references: the untrained dense model and SparseGPT's one-shot model (not the arms named dense / sparsegpt)
    refs = {"dense": perplexity(args.model, final_windows), "sparsegpt": perplexity(str(sgpt / "model"), final_windows)}
    scores = {arm: own_final(out / arm, final_windows) or perplexity(str(out / arm / "model"), final_windows)
              for arm in rows}
    dense_ppl, sgpt_ppl = refs["dense"]["perplexity"], refs["sparsegpt"]["perplexity"]
    same = final_windows == args.eval_windows  # the curve's windows are the final ones: nothing to redo
    curve_sgpt = refs["sparsegpt"]["perplexity"] if same else perplexity(str(sgpt / "model"), args.eval_windows)["perplexity"]
    curve_dense = refs["dense"]["perplexity"] if same else perplexity(args.model, args.eval_windows)["perplexity"]

    kept = kept_rows(results_dir / "sparse_training.json", args, refs) if args.keep_rows else {}
    rows = {**kept, **rows}
    table = [["arm", "ppl", "gap closed", "tokens/s", "peak RSS GiB", "fwd FLOPs", "bwd FLOPs", "change vs start",
              "change vs SparseGPT"]]
    table.append(["dense (no training)", dense_ppl, 1.0, None, None, None, None, None, None])
    table.append(["sparsegpt (one-shot)", sgpt_ppl, 0.0, None, round(sgpt_report["memory"]["peak_rss_bytes"] / 2**30, 3),
                  None, None, None, 0.0])
    for arm, r in rows.items():
        r["perplexity"] = scores.get(arm) or r["perplexity"]
        ppl = r["perplexity"]["perplexity"]
        r["gap_closed_vs_sparsegpt"] = (sgpt_ppl - ppl) / (sgpt_ppl - dense_ppl) if sgpt_ppl != dense_ppl else None
        table.append([arm, ppl, r["gap_closed_vs_sparsegpt"], r["tokens_per_second"], r["peak_rss_gib"],
                      r["forward_flops_vs_dense"], r["backward_flops_vs_dense"], r["mask_change_vs_start"],
                      r["mask_change_vs_sparsegpt"]])
    from compressor.reporting.markdown import table as markdown_table

    windows = refs["dense"]["windows"]
    markdown = markdown_table(table[0], table[1:])
    print(f"\nperplexity over {windows} windows of wiki.test.raw; {rows and next(iter(rows.values()))['tokens']} "
          f"training tokens of {args.train_data} per arm\n{markdown}")

    from compressor.reporting.plots import plot_lines

    series = {arm: [(e["tokens"], e["perplexity"]) for e in r["evals"]] for arm, r in rows.items()}
    end = max((r["tokens"] for r in rows.values()), default=0)
    series["dense (no training)"] = [(0, curve_dense), (end, curve_dense)]
    series["sparsegpt (one-shot)"] = [(0, curve_sgpt), (end, curve_sgpt)]
    results_dir.mkdir(parents=True, exist_ok=True)
    plot_lines(series, results_dir / "sparse_training_ppl.png", f"2:4 sparse training of {args.model}",
               "training tokens", f"perplexity (first {args.eval_windows} windows)", logy=True)
    result = {"protocol": "../shared/BENCHMARK.md; final perplexity over "
                          f"{windows} windows, the curve over the first {args.eval_windows}",
              "settings": {**vars(args), "arms": ["sparsegpt", *rows]}, "dense_perplexity": refs["dense"],
              "sparsegpt_perplexity": refs["sparsegpt"],
              "sparsegpt_prune_seconds": sgpt_report["timing"].get("prune_seconds"), "rows": rows, "table": markdown}
    write_results(results_dir / "sparse_training.json", result)


if __name__ == "__main__":
    main()
