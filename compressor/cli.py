"""The `compressor` command line: each sub-command validates a YAML config and calls a run driver."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Optional, Sequence

from compressor.errors import CompressorError
from compressor.utils.fs import describe_os_error
from compressor.utils.logging import get_logger, setup_logging

log = get_logger("compressor")


def _config_args(p: argparse.ArgumentParser, required: bool) -> None:
    p.add_argument("--config", required=required, help="YAML config (see configs/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set sparsity=2:8 --set calibration.num_windows=32")


def _output_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--output", required=True, help="run folder to write (model, masks, report)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    g.add_argument("--resume", action="store_true", help="continue an interrupted run in --output")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="compressor", description="Make LLaMA-family models N:M sparse.")
    parser.add_argument("--log-level", default="INFO")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prune", help="one-shot pruning (magnitude, wanda, sparsegpt, sparseswaps)")
    _config_args(p, required=True)
    _output_args(p)
    p.add_argument("--ray-address", help="join an existing Ray cluster (sets executor.address)")

    p = sub.add_parser("search", help="per-layer sparsity levels at an exact average: MSP (Fisher-seeded evolution), "
                                      "EvoPress-style, OWL and uniform; writes plan files")
    _config_args(p, required=True)
    _output_args(p)
    p.add_argument("--evaluate", action="store_true", help="perplexity of every plan (sets evaluation.enabled)")
    p.add_argument("--ray-address", help="join an existing Ray cluster (sets executor.address)")

    p = sub.add_parser("learn", help="sparse training (method: maskllm, fixed_mask, srste, pdp, bdwp, dense; "
                                     "single process or DeepSpeed)")
    _config_args(p, required=True)
    _output_args(p)

    from compressor.launch import add_launch_arguments

    p = sub.add_parser("launch", help="learn masks with megatron-core TP x PP x DP ranks scheduled by Ray")
    add_launch_arguments(p, config_flag=True)

    p = sub.add_parser("eval", help="evaluation tasks (perplexity, zero-shot, knowledge) of a model or a run folder")
    _config_args(p, required=False)
    p.add_argument("--model", help="model source: run folder, HF folder, .gguf file, hub name or smollm2-135m")
    p.add_argument("--output", help="write the report JSON here (a new file)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output file")

    p = sub.add_parser("report", help="one Markdown page with charts comparing runs (any command's report.json)")
    p.add_argument("runs", nargs="+", help="run folders (prune, learn, launch) or `compressor eval --output` JSON files")
    p.add_argument("--output", default="report", help="folder for report.md and its PNG charts (default: ./report)")

    from compressor.runs.export import EXAMPLES, add_export_arguments

    p = sub.add_parser("export", help="convert a run / HF folder to compressed N:M shards or dense-with-zeros",
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_export_arguments(p)
    return parser


def _load(cls, args):
    from compressor.config.base import load_config, parse_overrides, validate_config

    if args.config:
        return load_config(cls, args.config, args.overrides)
    return validate_config(cls, parse_overrides(args.overrides), "command line")


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level)
    try:
        if args.command == "prune":
            from compressor.runs.prune import PruneConfig, run_prune

            if args.ray_address:
                args.overrides.append(f"executor.address={args.ray_address}")
            report = run_prune(_load(PruneConfig, args), args.output, args.overwrite, args.resume)
            _summary(report)
        elif args.command == "search":
            from compressor.runs.search import SearchConfig, run_search

            if args.ray_address:
                args.overrides.append(f"executor.address={args.ray_address}")
            if args.evaluate:
                args.overrides.append("evaluation.enabled=true")
            report = run_search(_load(SearchConfig, args), args.output, args.overwrite, args.resume)
            for key, s in report["searches"].items():
                ppl = (s.get("perplexity") or {}).get("perplexity")
                print(f"{key}: fitness {s['final_fitness']:.5f}, {s['evaluations']} evaluations, average "
                      f"{s['average']:.6f}" + (f", perplexity {ppl:.3f}" if ppl else "") + f" -> {s['plan']}")
        elif args.command == "learn":
            from compressor.runs.learn import run_learn
            from compressor.training.config import LearnConfig

            report = run_learn(_load(LearnConfig, args), args.output, args.overwrite, args.resume)
            if report is not None:
                ppl = report.get("perplexity")
                print(f"{report['method']} {report['sparsity'] or 'dense'}: {len(report['history']['logs'])} log points"
                      + (f", hard-mask perplexity {ppl['perplexity']:.3f} ({ppl['windows']} windows)" if ppl else ""))
        elif args.command == "launch":
            from compressor.launch import run_from_args

            return run_from_args(args)
        elif args.command == "eval":
            from compressor.runs.evaluate import EvalRunConfig, run_eval

            if args.model:
                args.overrides.append(f"model.source={args.model}")
            report = run_eval(_load(EvalRunConfig, args), args.output, args.overwrite)
            tasks = report["evaluation"]["tasks"]  # perplexity alone prints as it always did
            print(json.dumps(report["perplexity"] if list(tasks) == ["perplexity"] else tasks, indent=2))
        elif args.command == "report":
            from compressor.reporting.compare import write_comparison

            print(write_comparison(args.runs, args.output))
        elif args.command == "export":
            from compressor.runs.export import run_export

            return run_export(args)
    except CompressorError as e:
        log.error("%s", e)
        return 2
    except OSError as e:  # a file we could not read or write, outside the paths that explain it themselves
        log.error("%s", describe_os_error(e))
        return 2
    return 0


def _summary(report: dict) -> None:
    s = report["summary"]
    ppl = report.get("perplexity")
    print(f"{report['method']} {report['sparsity']}: {s['linears']} linears, density {s['density']:.4f}, "
          f"mean layer error {s['mean_layer_error'] if s['mean_layer_error'] is None else round(s['mean_layer_error'], 4)}, "
          f"prune {report['timing']['prune_seconds']:.1f} s"
          + (f", perplexity {ppl['perplexity']:.3f} ({ppl['windows']} windows)" if ppl else ""))


if __name__ == "__main__":
    sys.exit(main())
