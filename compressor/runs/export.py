"""`compressor export` and tools/convert_checkpoint.py: convert between run outputs, dense-with-zeros HF
folders and compressed N:M shards. Both front ends share these arguments and this driver."""

from __future__ import annotations

import argparse
import sys

EXAMPLES = """Examples (from the repo root):

    # a run's output (model/ + masks.safetensors or logits.safetensors) -> compressed 2:4 shards in bf16
    compressor export runs/wanda out/wanda-2of4 --dtype bfloat16 --shard-size 500MB
    # compressed -> dense-with-zeros HF folder (e.g. for TensorRT-LLM)
    compressor export out/wanda-2of4 out/wanda-dense --to dense
    # a base model plus a mask file, only the MLP linears, with 2 Ray workers
    compressor export path/to/hf-model out/c --masks runs/x/masks.safetensors --targets '.*mlp.*' --executor ray --workers 2
"""


def add_export_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("source", help="run folder, HF model folder, or a compressor sharded export")
    ap.add_argument("output", help="new folder to write (must not exist unless --overwrite)")
    ap.add_argument("--to", dest="format", choices=["compressed", "dense"], default="compressed",
                    help="compressed N:M shards (default) or dense-with-zeros HF safetensors")
    ap.add_argument("--masks", help="masks.safetensors to apply (W * mask); default: the run's own")
    ap.add_argument("--logits", help="learned-mask logits.safetensors: the argmax pattern is applied")
    ap.add_argument("--sparsity", help="N:M pattern, e.g. 2:4 (default: from masks/logits/source, else 2:4)")
    ap.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], help="output dtype (default: the source's)")
    ap.add_argument("--shard-size", default="500MB", help="maximum shard size, e.g. 500MB, 2GB, 512MiB")
    ap.add_argument("--targets", nargs="+", default=[".*"], help="regexes of decoder linears to store sparse")
    ap.add_argument("--ignore", nargs="*", default=[], help="regexes of decoder linears to keep dense")
    ap.add_argument("--executor", choices=["inprocess", "ray"], default="inprocess", help="where shard jobs run")
    ap.add_argument("--workers", type=int, default=2, help="CPUs of a local Ray cluster (with --executor ray)")
    ap.add_argument("--overwrite", action="store_true",
                    help="replace an earlier export or run in the output folder (only once the new one is complete)")
    ap.add_argument("--trust-unverified", action="store_true",
                    help="read a source that has no valid manifest without verifying it (the output then gets no "
                         "manifest); by default such a source is verified in full: shapes, finite values, N:M patterns")
    ap.add_argument("--json", help="also write the summary as JSON to this file")


def run_export(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from compressor.checkpoints.convert import ExportOptions, convert_checkpoint, export_inputs, format_summary
    from compressor.config.base import validate_config
    from compressor.errors import CompressorError
    from compressor.execution.base import ExecutorConfig, make_executor
    from compressor.utils.fs import atomic_write_json
    from compressor.utils.run_folder import check_output_file

    bar: list[tqdm] = []

    def progress(result, done: int, total: int) -> None:
        if not bar:
            bar.append(tqdm(total=total, desc="shards", unit="shard"))
        bar[0].update(1)

    try:
        if args.json:
            check_output_file(args.json, args.overwrite, export_inputs(args.source, args.masks, args.logits))
        options = validate_config(ExportOptions, {
            "format": args.format, "sparsity": args.sparsity, "dtype": args.dtype, "shard_size": args.shard_size,
            "targets": tuple(args.targets), "ignore": tuple(args.ignore), "overwrite": args.overwrite,
            "trust_unverified": args.trust_unverified,
        }, "command line")
        with make_executor(ExecutorConfig(kind=args.executor, num_cpus=args.workers)) as executor:
            summary = convert_checkpoint(args.source, args.output, options, args.masks, args.logits, executor, progress)
    except CompressorError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        if bar:
            bar[0].close()
    print(format_summary(summary))
    if args.json:
        atomic_write_json(args.json, summary.to_dict())
    return 0
