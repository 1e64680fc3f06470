"""Mask transfer to a new domain (MaskLLM 2:4 on SmolLM2-135M): a mask learned on WikiText, used as it
is on CPython's documentation and fine-tuned there from its logits, against the dense model and the
SparseGPT prior (calibrated on WikiText). Evaluated on the held-out split of the documentation.

    python bench/transfer.py --general runs/bench-maskllm/sparsegpt-prior --prior-run runs/sgpt-mask --steps 20 --control
``--general`` is a `compressor learn` run on WikiText (bench/maskllm.py makes one); the fine-tune starts
from its logits (`init_logits`); `--control` also learns on the domain from the SparseGPT prior with the
same budget. Writes bench/results/transfer.json and bench/results/transfer_ppl.png.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from results_io import write_results  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "learn" / "smollm2_wikitext.yaml"
DOMAIN = "builtin:python-docs"


def quick_ppl(model: str, windows: int) -> float:
    from compressor.config.base import validate_config
    from compressor.runs.evaluate import EvalRunConfig, run_eval

    cfg = validate_config(EvalRunConfig, {"model": {"source": model}, "evaluation": {
        "data": {"source": DOMAIN, "split": "eval"}, "max_windows": windows}})
    return run_eval(cfg)["perplexity"]["perplexity"]


def learn(out: Path, sets: list[str], reuse: bool) -> dict:
    if not (reuse and (out / "report.json").is_file()):
        cmd = [sys.executable, "-m", "compressor.cli", "learn", "--config", str(CONFIG), "--output", str(out),
               "--overwrite"] + [a for s in sets for a in ("--set", s)]
        print("+", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True, cwd=ROOT, env={**os.environ, "RAY_AUTH_MODE": "disabled"})
    return json.loads((out / "report.json").read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--general", required=True, help="a `compressor learn` run on WikiText (its logits start the fine-tune)")
    ap.add_argument("--prior-run", required=True, help="the SparseGPT prior run the general mask started from")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--micro-batch", type=int, default=2)
    ap.add_argument("--grad-accum", type=int, default=2)
    ap.add_argument("--eval-every", type=int, default=10)
    ap.add_argument("--eval-windows", type=int, default=32)
    ap.add_argument("--set", dest="sets", action="append", default=[], help="extra config override for the fine-tune")
    ap.add_argument("--out", default=str(ROOT / "runs" / "bench-transfer"))
    ap.add_argument("--reuse", action="store_true", help="take finished runs as they are")
    ap.add_argument("--control", action="store_true",
                    help="also learn on the domain from the SparseGPT prior with the same budget")
    args = ap.parse_args()

    common = [f"train.data.source={DOMAIN}", "train.data.split=train", f"evaluation.data.source={DOMAIN}",
              "evaluation.data.split=eval", f"evaluation.max_windows={args.eval_windows}", f"train.steps={args.steps}",
              f"train.seq_len={args.seq_len}", f"train.micro_batch_size={args.micro_batch}",
              f"train.grad_accum={args.grad_accum}", f"train.eval_every={args.eval_every}",
              f"train.checkpoint_every={args.eval_every}", *args.sets]
    # The general logits are already decided (kappa 500, tau 0.05 at the end of their run); the
    # fine-tune starts cooler than a run from a prior, so that it refines them instead of re-mixing.
    report = learn(Path(args.out), [f"init_logits={args.general}", "maskllm.tau.start=1.0",
                                    "maskllm.kappa.start=500.0", *common], args.reuse)
    evals = report["history"]["evals"]
    tokens, windows = evals[-1]["tokens"], report["perplexity"]["windows"]
    rows = {"dense": quick_ppl("smollm2-135m", args.eval_windows),
            "SparseGPT mask (WikiText calibration)": quick_ppl(str(Path(args.prior_run) / "model"), args.eval_windows),
            "learned on WikiText, as it is": evals[0]["perplexity"],
            f"learned on WikiText, fine-tuned ({tokens} tokens)": evals[-1]["perplexity"]}
    control = None
    if args.control:  # the same budget on the domain, from the SparseGPT prior with the usual schedule
        control = learn(Path(args.out + "-from-prior"), ["prior.kind=file", f"prior.path={args.prior_run}", *common],
                        args.reuse)["history"]["evals"]
        rows[f"from the SparseGPT prior on the domain ({tokens} tokens)"] = control[-1]["perplexity"]
    print(f"\n{DOMAIN} (eval split: {windows} windows of {report['perplexity']['window_length']} tokens)")
    for name, ppl in rows.items():
        print(f"  {name:56s} {ppl:9.2f}")
    from compressor.reporting.plots import plot_lines

    series = {"fine-tune from the WikiText logits": [(e["tokens"], e["perplexity"]) for e in evals],
              "dense": [(0, rows["dense"]), (tokens, rows["dense"])],
              "SparseGPT mask": [(0, rows["SparseGPT mask (WikiText calibration)"]),
                                 (tokens, rows["SparseGPT mask (WikiText calibration)"])]}
    if control:
        series["from the SparseGPT prior"] = [(e["tokens"], e["perplexity"]) for e in control]
    plot_lines(series, ROOT / "bench" / "results" / "transfer_ppl.png", "Mask transfer to CPython docs (2:4)",
               "fine-tuning tokens", f"perplexity ({windows} windows)", logy=True)
    result = {"domain": DOMAIN, "eval_windows": windows, "rows": rows, "evals": evals, "control_evals": control,
              "general_run": args.general, "prior_run": args.prior_run, "settings": vars(args),
              "train_seconds": report["timing"].get("train"),
              "fine_tuned_full_eval": report.get("perplexity")}
    write_results(ROOT / "bench" / "results" / "transfer.json", result)


if __name__ == "__main__":
    main()
