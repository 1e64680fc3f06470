"""Peak resident memory (RSS) of one `compressor prune` or `compressor learn` process, predicted.

A pure calculation over ``ModelDims`` (``memory_plan``'s one shape table: the same presets and
``dims_for_source``), checked against measured peaks by ``bench/scale.py``. It counts what the code
holds at its worst moment, phase by phase, and reports the largest phase; every term is bytes.

**Process baseline** ``B``: Python, torch, transformers, pydantic, tokenizers and a loaded tokenizer,
allocator arenas: the peak RSS of a run on the tiny random model minus that run's (a few MB of)
predicted terms. Measured on this machine (2026-12-03, torch 2.13 CPU, transformers 5.23, SmolLM2's
tokenizer): 441 MiB for `compressor prune`, 440 MiB for `compressor learn` (``PRUNE_BASELINE``,
``LEARN_BASELINE``); `python bench/scale.py --smoke` measures them again.

**Allocator**: the terms count live tensors. glibc's malloc raises its mmap threshold (up to 32 MiB)
whenever a mapped block is freed, after which freed blocks below it stay in the heap: a peak RSS then
also measures the heap's history, by a varying amount (one 96-window prune of a random hidden-512
model: 1234 MiB, against 860 MiB with a fixed threshold). The figures are checked with
``MALLOC_MMAP_THRESHOLD_=1048576`` (a fixed threshold: every block of 1 MiB or more mapped on its own
and returned when freed), as ``bench/scale.py`` runs every step.

**prune** (``compressor.pipelines.sequential`` with the in-process executor; ``model.lazy: true`` reads
one decoder block at a time, ``compressor.runs.prune.LazyWalk``). With h hidden, I intermediate, N
calibration windows of T tokens, a the bytes of the model dtype (block inputs stay in it), b the
windows of one forward batch:

- weights: lazy, one block (its 7 linears, q/k/v biases, 2 norms) plus the embedding (needed by the
  capture pass; released after it) -- not lazy, the whole model;
- activation streams: N x T x h x a each. The pruned stream (statistics) and, with ``layer_error``,
  the dense stream (the inputs each layer sees in the dense model); a block pass builds its outputs
  while its inputs are alive, so calibration holds streams + 1 (measured: the pipeline used to keep
  block 0's inputs and the discarded outputs of a statistics pass referenced, two streams more). The
  rotary tables captured with the inputs, cos and sin per batch: 2 x N / b x T x head_dim x a, shared
  by the streams;
- statistics: a float64 Gram matrix per input group (q/k/v, o, gate/up: h^2; down: I^2) x 8 B, for
  the pruned stream (SparseGPT, SparseSwaps) and for the dense stream (layer error): at most one set
  of each is alive at a time (Wanda's column norms are negligible). Adding a batch costs its float32
  product (4 x in^2 B), added into the float64 sum in place;
- the block forward of one batch (no grad): b x T x (6h + 2 kv_dim + 3I) x a;
- the SparseGPT solve of the widest group (in-process: the group's layers stacked): the Hessian factor
  works on a flipped float64 copy and ends with a float32 cast and its flip while that copy lives:
  16 x in^2 B; the column sweep holds the float32 factor (4 in^2), the stacked weight, its float32
  transposed copy, masks and the new weight: 4 in^2 + (a + 4 + 4 + 3) x rows x in. The block's results
  (new weights and bool masks, (a + 1) B per weight) stay until the block is written;
- masks: the mask of every pruned layer is kept to the end for ``masks.safetensors``, packed
  (``compressor.sparsity.PackedMasks``, 1 bit per weight): at the last block, all earlier blocks';
- inputs: the calibration windows, N x T x 8 B;
- load: the weights read (lazy: the embedding) and the NaN / inf check over them, in chunks of 2^24
  values whose float and bool temporaries are (a + 2) B each (a whole-tensor check of Qwen2.5-0.5B's
  embedding used to add 0.9 GiB: the load peaked at 1.87 GiB, 1.09 with chunks).
Each layer's error against the dense inputs (``methods.objective.reconstruction_error``) holds float64
copies of its weight, its pruned weight and their difference, then the difference times the Gram matrix:
24 B per weight of the largest linear. Writing a block (safetensors serializes a bytes copy of a shard)
costs one more copy of the block.

**learn** (MaskLLM, single process, ``sample_every: step``, the prior from a file; C = C(M, N)):

- weights: every parameter in the model dtype (``precision.compute: bfloat16`` stores the masked,
  frozen ones in bf16); the prior's bool masks (1 B per masked weight) stay referenced by the learner;
- logits C / M per masked weight in the logits dtype l; AdamW's 2 states each, from the first step on;
  the argmax pattern ids of the flip rate, 1 B per group;
- the held sample: W * mask and its accumulated gradient G (4 B each: float32) and the float32
  pattern probabilities (4 C / M B per weight);
- activations saved for backward, per token and layer (HF LLaMA / Qwen2 with SDPA, counted and checked
  against ``torch.autograd.graph.saved_tensors_hooks`` in tests): a x (7h + 2 kv_dim + 4I), plus the
  loss head at its backward: the logits, the saved log-softmax and the two gradients, 4 x V x 4 B
  per token;
- the checkpoint written at the end of the run (``checkpoint_every`` and the last step): the logits
  are cloned for the learner's state, and ``checkpoints.tree`` clones every tensor of a file while it
  writes it (safetensors writes from those copies without another): the rank's file (AdamW's states,
  2 l C / M per weight) and then the shared one (the logits), so the copies peak at the larger of the
  two, beside the state's clone. Measured (SmolLM2-135M, 2026-12-03, the run's "checkpoint" phase):
  4.65 GiB, 4.62 predicted; it used to be predicted with both files' copies and a serialized bytes
  copy at once (5.80).

Checked (``bench/scale.py``, 2026-12-03, an AVX2 host, fixed mmap threshold, baselines measured on the
host: 419 / 426 MiB): MaskLLM 6 steps of 1 x 512, SmolLM2-135M 4.93 GiB measured / 5.18 predicted,
Qwen2.5-Coder-0.5B 15.35 / 16.19. The lazy prune (32 windows) is under-predicted: SmolLM2 0.89 / 0.73,
Qwen 2.59 / 1.46. On Qwen the RSS after every block is back at 0.82-0.87 GiB, and a block with one
pruned linear peaks at 1.20 GiB, but with all seven the solve and the rest of the block sit about
1.1 GiB higher: live memory after the solve that these terms do not yet name.

Not counted: the Python objects of reports and layer lists, fragmentation beyond the baseline's,
page cache (file pages mapped by safetensors while a tensor is read count as RSS only during the
read: ``compressor.models.lazy.WeightStore`` closes its files after each block).

    python -m compressor.parallel.process_memory prune qwen2.5-coder-1.5b
    python -m compressor.parallel.process_memory learn smollm2-135m --micro-batch 1
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass, field
from typing import Optional, Sequence

from compressor.parallel.memory_plan import GIB, PRESETS, ModelDims, dims_for_source

# Measured process baselines (see the module docstring): peak RSS of `compressor prune` / `learn` on the
# tiny random model (tests/factories.py), whose model terms are a few MB. 2026-12-03, this machine.
PRUNE_BASELINE = 441 * 2**20  # `python bench/scale.py --smoke`: 440.6 MiB
LEARN_BASELINE = 440 * 2**20  # the same run's learn step: 440.1 MiB

F64, F32 = 8, 4


@dataclass(frozen=True)
class PruneSetup:
    num_windows: int = 128
    seq_len: int = 512
    batch_size: int = 8  # calibration windows per forward pass
    weight_bytes: int = 4  # model.dtype: weights and the activation streams
    stats: str = "gram"  # what the method reads: "gram" (SparseGPT, SparseSwaps), "norms" (Wanda), "none"
    layer_error: bool = True
    lazy: bool = True
    baseline: float = PRUNE_BASELINE


@dataclass(frozen=True)
class LearnSetup:
    n: int = 2
    m: int = 4
    micro_batch: int = 4
    seq_len: int = 512
    weight_bytes: int = 4  # model.dtype
    frozen_bytes: Optional[int] = None  # of the masked, frozen weights; 2 with precision.compute bfloat16
    logits_bytes: int = 4
    optimizer_states: int = 2  # AdamW
    prior_masks: bool = True  # a prior (file or one-shot) whose bool masks the learner keeps
    checkpoint: bool = True  # the run ends with a checkpoint (it always does: done == steps)
    baseline: float = LEARN_BASELINE


@dataclass(frozen=True)
class Estimate:
    """The predicted peak: the phase it falls in and its terms, with the other phases' totals."""

    phase: str
    items: dict[str, float]
    phases: dict[str, float] = field(default_factory=dict)

    @property
    def total(self) -> float:
        return sum(self.items.values())

    def table(self) -> str:
        width = max(len(k) for k in self.items)
        lines = [f"{k:<{width}}  {v / GIB:8.3f} GiB" for k, v in self.items.items()]
        lines.append(f"{'peak (' + self.phase + ')':<{width}}  {self.total / GIB:8.3f} GiB")
        others = ", ".join(f"{p} {t / GIB:.3f}" for p, t in self.phases.items() if p != self.phase)
        return "\n".join(lines + ([f"other phases (GiB): {others}"] if others else []))


def block_params(dims: ModelDims) -> int:
    """Parameters of one decoder block: its 7 linears, q/k/v biases, 2 RMSNorm weights."""
    return dims.masked_per_layer() + dims.bias_per_layer() + 2 * dims.hidden


def input_groups(dims: ModelDims) -> dict[str, tuple[int, int]]:
    """Statistics groups of a block: name -> (rows of its stacked layers, input width)."""
    h, d, i = dims.hidden, dims.kv_dim, dims.intermediate
    return {"qkv": (h + 2 * d, h), "o": (h, h), "gate_up": (2 * i, h), "down": (h, i)}


def _solve_peak(dims: ModelDims, a: int) -> float:
    """The SparseGPT solve's working set of its largest group: the factor or the column sweep."""
    peaks = []
    for rows, cols in input_groups(dims).values():
        factor = 16 * cols * cols
        sweep = 4 * cols * cols + (a + 4 + 4 + 3) * rows * cols
        peaks.append(max(factor, sweep))
    return max(peaks)


def predict_prune(dims: ModelDims, s: PruneSetup = PruneSetup()) -> Estimate:
    """Peak RSS of `compressor prune` (one process, in-process executor), by phase."""
    from compressor.models.checks import FINITE_CHECK_CHUNK
    a, h, n_tok = s.weight_bytes, dims.hidden, s.num_windows * s.seq_len
    stream = n_tok * h * a
    streams = (s.stats != "none") + s.layer_error
    block = block_params(dims) * a
    embed = dims.vocab * h * a
    common = {
        "baseline": s.baseline,
        "weights": block if s.lazy else dims.total_params() * a,
        "calibration windows": n_tok * 8,
        # cos and sin of each batch's positions, (1, T, head_dim): the same for every window of a batch
        "rotary tables": 2 * math.ceil(s.num_windows / s.batch_size) * s.seq_len * dims.head_dim * a if streams else 0,
        # packed, a bit per weight (``PackedMasks``); at the last block, every earlier block's
        "masks kept": (dims.layers - 1) * dims.masked_per_layer() / 8,
    }
    grams = sum(cols * cols * F64 for _, cols in input_groups(dims).values())
    gram_sets = (s.stats == "gram") + s.layer_error
    # with both, the dense set of block k is formed while block k-1's pruned set is still referenced, then the
    # pruned set of block k beside it: two sets at any time; with one, the old set goes before the new one
    statistics = gram_sets * grams
    widest = max(cols for _, cols in input_groups(dims).values())
    forward = s.batch_size * s.seq_len * (6 * h + 2 * dims.kv_dim + 3 * dims.intermediate) * a
    results = dims.masked_per_layer() * (a + 1)
    largest = max(o * i for o, i, _ in dims.linear_shapes().values())
    largest_tensor = max(dims.vocab * h, largest)
    phases: dict[str, dict[str, float]] = {
        # the load's NaN / inf check of the weights read (``models.checks.all_finite``): isfinite's float and
        # bool temporaries of one chunk of the largest tensor
        "load": {"baseline": s.baseline, "weights": embed if s.lazy else dims.total_params() * a,
                 "finite check": min(largest_tensor, FINITE_CHECK_CHUNK) * (a + 2)},
        "capture": {**common, "embedding": embed, "activation streams": streams * stream, "masks kept": 0},
        "calibrate": {**common, "activation streams": (streams + 1) * stream if streams else 0,
                      "statistics": statistics, "statistics update": 4 * widest * widest if gram_sets else 0,
                      "block forward": forward},
        "solve": {**common, "activation streams": streams * stream, "statistics": statistics,
                  "solve working set": _solve_peak(dims, a) if s.stats == "gram" else 0,
                  "block results": results},
        "layer error": {**common, "activation streams": streams * stream, "statistics": statistics,
                        "block results": results, "error working set": 24 * largest if s.layer_error else 0},
        "write block": {**common, "activation streams": streams * stream, "statistics": statistics,
                        "block results": results, "shard bytes copy": block},
    }
    if not s.lazy:
        phases.pop("write block")
        phases["capture"].pop("embedding")
    totals = {p: sum(v.values()) for p, v in phases.items()}
    top = max(totals, key=totals.get)
    return Estimate(top, {k: float(v) for k, v in phases[top].items() if v}, totals)


def saved_activation_bytes(dims: ModelDims, tokens: int, a: int = 4) -> float:
    """Bytes autograd keeps for backward in the decoder layers: per token and layer 7h + 2 kv_dim + 4I
    values (the norms' inputs and outputs 4h; q, o's input and the attention output 3h; k and v;
    the MLP's gate, SiLU, up and product 4I)."""
    h, d, i = dims.hidden, dims.kv_dim, dims.intermediate
    return float(tokens * dims.layers * (7 * h + 2 * d + 4 * i) * a)


def predict_learn(dims: ModelDims, s: LearnSetup = LearnSetup()) -> Estimate:
    """Peak RSS of single-process `compressor learn` with MaskLLM, by phase."""
    masked = dims.layers * dims.masked_per_layer()
    frozen = s.frozen_bytes or s.weight_bytes
    logits = masked / s.m * math.comb(s.m, s.n) * s.logits_bytes
    tokens = s.micro_batch * s.seq_len
    common = {
        "baseline": s.baseline,
        "weights": masked * frozen + (dims.total_params() - masked) * s.weight_bytes,
        "prior masks": masked if s.prior_masks else 0,
        "logits": logits,
        "optimizer states": s.optimizer_states * logits,
        "pattern ids": masked / s.m,
    }
    probs = masked / s.m * math.comb(s.m, s.n) * F32
    phases: dict[str, dict[str, float]] = {
        "step": {**common, "held sample and its gradient": 2 * masked * F32, "sample probabilities": probs,
                 "activations": saved_activation_bytes(dims, tokens, s.weight_bytes),
                 "loss head": 4 * tokens * dims.vocab * F32},
    }
    if s.checkpoint:
        opt = s.optimizer_states * logits
        # the rank's file (optimizer states) and the shared one (logits) are written one after the other
        phases["checkpoint"] = {**common, "logits copy (state)": logits, "checkpoint copies": max(opt, logits)}
    totals = {p: sum(v.values()) for p, v in phases.items()}
    top = max(totals, key=totals.get)
    return Estimate(top, {k: float(v) for k, v in phases[top].items() if v}, totals)


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m compressor.parallel.process_memory",
                                 description="Predicted peak RSS of a single-process prune or learn run.")
    ap.add_argument("command", choices=["prune", "learn"])
    ap.add_argument("model", help=f"a preset ({', '.join(sorted(PRESETS))}) or a local HF folder")
    ap.add_argument("--num-windows", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=8, help="prune: calibration windows per forward")
    ap.add_argument("--micro-batch", type=int, default=4, help="learn: train.micro_batch_size")
    ap.add_argument("--no-layer-error", action="store_true")
    ap.add_argument("--not-lazy", action="store_true")
    args = ap.parse_args(argv)
    try:
        dims = PRESETS[args.model] if args.model in PRESETS else dims_for_source(args.model)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.command == "prune":
        est = predict_prune(dims, PruneSetup(args.num_windows, args.seq_len, args.batch_size,
                                             layer_error=not args.no_layer_error, lazy=not args.not_lazy))
    else:
        est = predict_learn(dims, LearnSetup(micro_batch=args.micro_batch, seq_len=args.seq_len))
    print(est.table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
