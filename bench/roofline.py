"""How much of this machine each stage uses: the GEMM limit per dtype (measured) and, for every stage of
the pipeline, the achieved GFLOP/s of the float32 path and the bf16 path side by side, in one run.

    python bench/roofline.py                 # table, bench/results/roofline.json and roofline.png
    python bench/roofline.py --repeats 5

Stages (SmolLM2-135M shapes, analytic FLOPs of the matrix products only):
- calibration forward: one decoder block on 8 x 512 tokens (linears + attention scores and values);
- statistics: the Gram matrix X^T X of 4096 x 1536 inputs (down_proj's);
- SparseGPT sweep: down_proj (576 x 1536) pruned 2:4 from its Gram matrix (the solve keeps float32 /
  float64 whatever the precision: both columns run the same code, so they show what is left);
- MaskLLM step: one micro-batch of 2 x 512 tokens, forward + backward with held soft masks (bf16: the
  frozen weights held in bf16, samples float32);
- evaluation: a forward pass of 4 x 512 tokens through the whole model, LM head included.
Settings are interleaved repeat by repeat and the medians reported (this host is shared and drifts).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

from compressor.precision import Precision, bf16_hardware
from results_io import write_results  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PATHS = {"float32": Precision(), "bfloat16": Precision(compute="bfloat16", statistics="bfloat16")}


def seconds(fn: Callable[[], object], repeats: int) -> list[float]:
    fn()  # warm-up (allocations, oneDNN primitive caches)
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def gemm_limits(repeats: int) -> dict[str, float]:
    """The best GFLOP/s of a few large products, per dtype."""
    shapes = [(4096, 576, 1536), (4096, 1536, 576), (2048, 2048, 2048)]
    limits = {}
    for dtype in (torch.float64, torch.float32, torch.bfloat16):
        best = 0.0
        for m, k, n in shapes:
            a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
            best = max(best, 2 * m * k * n / statistics.median(seconds(lambda: a @ b, repeats)) / 1e9)
        limits[str(dtype).removeprefix("torch.")] = round(best, 1)
    return limits


def _model():
    from compressor.models import load_model

    loaded = load_model("smollm2-135m")
    for p in loaded.model.parameters():
        p.requires_grad_(False)
    return loaded


def stage_block_forward(loaded, precision: Precision):
    from compressor.calibration import BlockInputs, run_block
    from compressor.calibration.blocks import capture_block_inputs

    ids = torch.randint(0, 49152, (8, 512), generator=torch.Generator().manual_seed(0))
    inputs = capture_block_inputs(loaded.model, loaded.arch, ids, 8)
    block = loaded.model.model.layers[3]
    linear = sum(p.numel() for n, p in block.named_parameters() if n.endswith("proj.weight"))
    cfg = loaded.model.config
    tokens, t, d = ids.numel(), ids.shape[1], cfg.hidden_size
    flops = 2 * linear * tokens + 2 * 2 * t * d * tokens  # linears; QK^T and AV (full, not halved by causality)
    return flops, lambda: run_block(block, BlockInputs(inputs.hidden, inputs.kwargs), precision=precision)


def stage_statistics(precision: Precision):
    from compressor.calibration.stats import InputStats

    x = torch.randn(4096, 1536)
    stats = InputStats.empty("gram", 1536, precision.statistics_dtype)
    return 2 * 4096 * 1536**2, lambda: stats.add(x)


def stage_sparsegpt(precision: Precision):
    from compressor.methods.sparsegpt import sparsegpt
    from compressor.sparsity import NM

    g = torch.Generator().manual_seed(0)
    x = torch.randn(8192, 1536, generator=g)
    gram = (x.T @ x).double()
    w = torch.randn(576, 1536, generator=g) * 0.02
    rows, cols = w.shape
    flops = 2 * rows * cols**2 + 2 * cols**3 // 3  # lazy-batch OBS updates + the Hessian factor
    return flops, lambda: sparsegpt(w, gram, NM(2, 4))


def stage_maskllm(loaded, precision: Precision):
    import copy

    from compressor.methods.maskllm import MaskLLMConfig, attach_masks, hold_samples, mask_train, step_surrogate
    from compressor.methods.maskllm.attach import store_frozen_weights
    from compressor.models.layers import prunable_linears

    model = copy.deepcopy(loaded.model)
    names = [t.name for t in prunable_linears(model, loaded.arch)]
    masks = attach_masks(model, names, MaskLLMConfig(sparsity="2:4"), seed=0)
    if precision.compute == "bfloat16":
        store_frozen_weights(model, masks, torch.bfloat16)
    mask_train(masks, True)
    ids = torch.randint(0, 49152, (2, 512), generator=torch.Generator().manual_seed(1))
    linear = sum(model.get_submodule(n).parametrizations.weight.original.numel() for n in names)
    d, v = model.config.hidden_size, model.config.vocab_size
    # forward + input gradient + masked-weight gradient of every linear, the LM head's forward and input gradient
    flops = 6 * linear * ids.numel() + 4 * d * v * ids.numel()

    def step():
        hold_samples(model, masks, dtype=torch.float32 if precision.compute == "bfloat16" else None)
        with precision.autocast():
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss.float()
        loss.backward()
        step_surrogate(masks, 0.0).backward()
        for m in masks.values():
            m.logits.grad = None

    return flops, step


def stage_evaluation(loaded, precision: Precision):
    ids = torch.randint(0, 49152, (4, 512), generator=torch.Generator().manual_seed(2))
    params = sum(p.numel() for n, p in loaded.model.named_parameters() if "embed" not in n)
    d, v = loaded.model.config.hidden_size, loaded.model.config.vocab_size
    flops = 2 * params * ids.numel() + 2 * d * v * ids.numel()

    @torch.no_grad()
    def forward():
        with precision.autocast():
            loaded.model(input_ids=ids, use_cache=False)

    return flops, forward


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default=str(ROOT / "bench" / "results" / "roofline.json"))
    args = ap.parse_args()
    torch.manual_seed(0)
    limits = gemm_limits(args.repeats)
    loaded = _model()
    builders = {
        "calibration forward": lambda p: stage_block_forward(loaded, p),
        "statistics (Gram)": stage_statistics,
        "SparseGPT sweep": stage_sparsegpt,
        "MaskLLM step": lambda p: stage_maskllm(loaded, p),
        "evaluation forward": lambda p: stage_evaluation(loaded, p),
    }
    rows = []
    for stage, build in builders.items():
        built = {name: build(p) for name, p in PATHS.items()}
        times: dict[str, list[float]] = {name: [] for name in PATHS}
        for name, (_, fn) in built.items():
            fn()  # warm-up
        for _ in range(args.repeats):  # interleaved, so that drift hits both paths alike
            for name, (_, fn) in built.items():
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
        row = {"stage": stage}
        for name, (flops, _) in built.items():
            median = statistics.median(times[name])
            gflops = flops / median / 1e9
            row[name] = {"seconds": round(median, 4), "gflops": round(gflops, 1), "gflop": round(flops / 1e9, 2),
                         "of_bf16_limit": round(gflops / limits["bfloat16"], 3)}
        row["speedup"] = round(row["float32"]["seconds"] / row["bfloat16"]["seconds"], 2)
        rows.append(row)
        print(f"{stage:22s} fp32 {row['float32']['gflops']:8.1f} GFLOP/s  bf16 {row['bfloat16']['gflops']:8.1f} GFLOP/s"
              f"  ({row['speedup']:.2f}x, {100 * row['bfloat16']['of_bf16_limit']:.0f}% of the bf16 limit)", flush=True)
    result = {"protocol": "../shared/BENCHMARK.md shapes (SmolLM2-135M)", "threads": torch.get_num_threads(),
              "bf16_hardware": bf16_hardware(), "gemm_limit_gflops": limits, "stages": rows}
    print("GEMM limits (GFLOP/s):", limits)
    write_results(args.json, result)
    _plot(result, Path(args.json).with_suffix(".png"))
    print(f"wrote {args.json}")


def _plot(result: dict, path: Path) -> None:
    from compressor.reporting.plots import _pyplot

    plt = _pyplot()
    stages = [r["stage"] for r in result["stages"]]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    width = 0.38
    for i, name in enumerate(PATHS):
        ax.bar([k + (i - 0.5) * width for k in range(len(stages))], [r[name]["gflops"] for r in result["stages"]],
               width, label=f"{name} path")
    for dtype, style in (("float32", ":"), ("bfloat16", "--")):
        ax.axhline(result["gemm_limit_gflops"][dtype], linestyle=style, color="grey", linewidth=1)
        ax.text(len(stages) - 0.5, result["gemm_limit_gflops"][dtype], f"{dtype} GEMM limit", fontsize=7,
                ha="right", va="bottom")
    ax.set_xticks(range(len(stages)), stages, fontsize=8)
    ax.set_ylabel("achieved GFLOP/s")
    ax.set_title(f"Stages against the GEMM limits ({result['threads']} threads, bf16 on {result['bf16_hardware']})")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
