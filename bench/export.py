"""Compressed 2:4 export of SmolLM2-135M in bf16: sizes against dense, export and load throughput.

Prunes the embedded SmolLM2-135M 2:4 by magnitude (inside this script), saves it as a dense-with-zeros
HF folder (float32, like a run's model/), then exports it in bf16: dense-with-zeros and compressed, the
latter in-process and with 1 and 2 Ray workers; reads the compressed checkpoint back (checksums +
decompression) the same ways. Prints a table and writes bench/results/export.json.

    python bench/export.py                       # shards of 50MB, best of 2 runs per row
    python bench/export.py --shard-size 20MB --repeats 3
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path
from results_io import write_results  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def prune_to_folder(folder: Path) -> dict:
    import torch

    from compressor.models import load_model, prunable_linears
    from compressor.sparsity import NM, nm_mask_from_scores

    loaded = load_model("smollm2-135m")
    targets = prunable_linears(loaded.model, loaded.arch)
    with torch.no_grad():
        for t in targets:
            weight = loaded.model.get_submodule(t.name).weight
            weight.mul_(nm_mask_from_scores(weight.abs(), NM(2, 4), t.name))
    loaded.model.save_pretrained(folder)
    loaded.tokenizer.save_pretrained(folder)
    return {"linears": len(targets), "parameters": sum(p.numel() for p in loaded.model.parameters())}


def timed(fn, repeats: int) -> tuple[float, list[float], object]:
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return min(times), times, result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shard-size", default="50MB")
    ap.add_argument("--repeats", type=int, default=2, help="runs per row; the fastest is reported")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="Ray worker counts")
    ap.add_argument("--json", default=str(ROOT / "bench" / "results" / "export.json"))
    args = ap.parse_args()

    from compressor.checkpoints.convert import ExportOptions, convert_checkpoint, sparse_weight_names
    from compressor.checkpoints.load import load_compressed_model, read_state_dict
    from compressor.execution.base import ExecutorConfig, InProcessExecutor, make_executor

    work = Path(tempfile.mkdtemp(prefix="bench-export-"))
    try:
        model_info = prune_to_folder(work / "pruned")
        sparse_weight_names(work / "pruned")  # warm the transformers imports outside the timings
        dense = convert_checkpoint(work / "pruned", work / "dense",
                                   ExportOptions(format="dense", dtype="bfloat16", shard_size=args.shard_size))
        opts = ExportOptions(dtype="bfloat16", shard_size=args.shard_size, overwrite=True)
        executors = [("in-process", 0)] + [(f"ray x{w}", w) for w in args.workers]
        export_rows, load_rows, compressed = [], [], None
        for label, workers in executors:
            executor = (InProcessExecutor() if not workers else
                        make_executor(ExecutorConfig(kind="ray", num_cpus=workers, object_store_mb=1000)))
            with executor:
                export = lambda: convert_checkpoint(work / "pruned", work / "compressed", opts, executor=executor)  # noqa: E731
                best, times, compressed = timed(export, args.repeats)
                export_rows.append({"executor": label, "workers": workers or 1, "seconds": round(best, 3),
                                    "runs": [round(t, 3) for t in times],
                                    "mb_per_s_written": round(compressed.output_file_bytes / 1e6 / best, 1),
                                    "mb_per_s_dense_equivalent": round(dense.output_file_bytes / 1e6 / best, 1)})
                best, times, _ = timed(lambda: read_state_dict(work / "compressed", executor=executor), args.repeats)
                load_rows.append({"executor": label, "workers": workers or 1, "what": "read: verify + decompress",
                                  "seconds": round(best, 3), "runs": [round(t, 3) for t in times],
                                  "mb_per_s_read": round(compressed.output_file_bytes / 1e6 / best, 1)})
        best, times, _ = timed(lambda: load_compressed_model(work / "compressed"), args.repeats)
        load_rows.append({"executor": "in-process", "workers": 1, "what": "load model (+ build)",
                          "seconds": round(best, 3), "runs": [round(t, 3) for t in times],
                          "mb_per_s_read": round(compressed.output_file_bytes / 1e6 / best, 1)})
    finally:
        shutil.rmtree(work, ignore_errors=True)

    sizes = {
        "linear_dense_bytes": compressed.linear_dense_bytes, "linear_compressed_bytes": compressed.linear_stored_bytes,
        "linear_ratio": round(compressed.linear_stored_bytes / compressed.linear_dense_bytes, 5),
        "checkpoint_dense_bytes": dense.output_file_bytes, "checkpoint_compressed_bytes": compressed.output_file_bytes,
        "checkpoint_ratio": round(compressed.output_file_bytes / dense.output_file_bytes, 5),
        "shards_dense": dense.shards, "shards_compressed": compressed.shards, "sparse_layers": compressed.sparse_layers,
    }
    mb = lambda n: f"{n / 1e6:8.1f} MB"  # noqa: E731
    print(f"SmolLM2-135M, 2:4 magnitude, bf16, shards <= {args.shard_size}, {model_info['linears']} sparse linears")
    print(f"{'':22s} {'dense':>11s} {'compressed':>11s} {'ratio':>7s}")
    print(f"{'linear layers':22s} {mb(sizes['linear_dense_bytes'])} {mb(sizes['linear_compressed_bytes'])} "
          f"{sizes['linear_ratio']:7.4f}")
    print(f"{'whole checkpoint':22s} {mb(sizes['checkpoint_dense_bytes'])} {mb(sizes['checkpoint_compressed_bytes'])} "
          f"{sizes['checkpoint_ratio']:7.4f}")
    print(f"\n{'step (MB/s of checkpoint files)':32s} {'executor':11s} {'seconds':>8s} {'MB/s':>8s}")
    for row in export_rows:
        print(f"{'export: compress + write':32s} {row['executor']:11s} {row['seconds']:8.2f} "
              f"{row['mb_per_s_written']:8.1f}")
    for row in load_rows:
        print(f"{row['what']:32s} {row['executor']:11s} {row['seconds']:8.2f} {row['mb_per_s_read']:8.1f}")
    out = {"model": "smollm2-135m", "sparsity": "2:4", "mask": "magnitude", "dtype": "bfloat16",
           "shard_size": args.shard_size, "repeats": args.repeats, "parameters": model_info["parameters"],
           "sizes": sizes, "export": export_rows, "load": load_rows,
           "note": "best of `repeats` runs; the machine has 2 CPU cores shared with other work"}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    write_results(args.json, out)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
