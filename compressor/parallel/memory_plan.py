"""Per-rank memory of MaskLLM mask learning under megatron-core tensor (TP) and pipeline (PP) parallelism.

A pure calculation, per pipeline stage (every TP rank of a stage holds the same amount):

- parameters: frozen weights in the weight dtype (bf16 on GPUs). Column-parallel linears split their
  output rows over TP, row-parallel ones their input columns; the vocab-parallel embedding sits on the
  first stage and the output layer on the last (megatron keeps a copy of a tied embedding there when
  PP > 1); RMSNorm weights are replicated and float32 (megatron's torch RMSNorm ignores the weight dtype);
  Qwen2's q/k/v biases (never masked) split like their rows.
- logits: C(M, N) per group of M masked weights (6 per 4 weights for 2:4), in the logits dtype; their
  gradients the same again; AdamW 2 states each, in the logits dtype (as torch keeps them).
- soft mask: what ``compressor.methods.maskllm.mask`` keeps during a step: the float32 Gumbel-Softmax
  probabilities (C / M per weight), the held soft-masked weight W * mask and its accumulated gradient (each
  in the weight dtype), plus, transiently, the float32 soft mask of one masked linear (megatron masks the fused
  q/k/v and the fused gate/up as one linear each).
- activations (the standard estimate of Korthikanti et al. 2022, "Reducing Activation Recomputation in
  Large Transformer Models", redone for LLaMA blocks), bytes per token per layer, with a = activation
  bytes, h hidden, d = kv heads x head dim, I intermediate, H heads, s seq len, t = TP:
      a * [4h + (2h + 2d + 3I) / t + H * s / t]
  4h: the two RMSNorm inputs and outputs (replicated over TP unless sequence parallel); 2h + 2d: Q, K, V
  and the attention output; 3I: gate, up and SwiGLU outputs; H * s: the softmax of the scores, absent with
  flash attention. With full recompute only each layer's input (a * h) is kept, plus one layer's full
  activations while it is recomputed. Under 1F1B stage i holds min(PP - i, micro-batches) micro-batches.
  The last stage also holds the cross-entropy's logits: (a + 4 + 4) bytes x vocab / t per token
  (the output layer's logits, their float32 copy and the saved float32 softmax).

Single-process runs (a lazy `compressor prune`, `compressor learn`) are predicted by the sibling module
``compressor.parallel.process_memory`` over the same ``ModelDims`` and presets.

Not counted: CUDA context and NCCL buffers (~1-2 GiB per GPU), allocator fragmentation, p2p buffers. Keep
10-15 % headroom.

    python -m compressor.parallel.memory_plan --config configs/distributed/llama2_7b_tp8.yaml
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence

if TYPE_CHECKING:
    from compressor.parallel.config import DistributedLearnConfig

GIB = 2**30
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# megatron's local layer spec builds RMSNorm as torch.nn.RMSNorm, which ignores params_dtype: float32 weights.
NORM_BYTES = 4


@dataclass(frozen=True)
class ModelDims:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tied_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2: biases on q, k and v (dense, never masked)

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def linear_shapes(self) -> dict[str, tuple[int, int, str]]:
        """Masked linears of one decoder layer: name -> (out, in, how megatron splits it over TP)."""
        h, d, i = self.hidden, self.kv_dim, self.intermediate
        return {"q_proj": (h, h, "column"), "k_proj": (d, h, "column"), "v_proj": (d, h, "column"),
                "o_proj": (h, h, "row"), "gate_proj": (i, h, "column"), "up_proj": (i, h, "column"),
                "down_proj": (h, i, "row")}

    def fused_linear_sizes(self) -> tuple[int, ...]:
        """Weights of each linear megatron masks as one: fused QKV, attention output, fused gate/up, down."""
        h, d, i = self.hidden, self.kv_dim, self.intermediate
        return ((h + 2 * d) * h, h * h, 2 * i * h, h * i)

    def masked_per_layer(self) -> int:
        return sum(o * i for o, i, _ in self.linear_shapes().values())

    def bias_per_layer(self) -> int:
        """Bias parameters of one decoder layer, all in column-parallel linears (q, k, v rows)."""
        return self.hidden + 2 * self.kv_dim if self.qkv_bias else 0

    def total_params(self) -> int:
        embeddings = self.vocab * self.hidden * (1 if self.tied_embeddings else 2)
        per_layer = self.masked_per_layer() + self.bias_per_layer() + 2 * self.hidden
        return self.layers * per_layer + self.hidden + embeddings


@dataclass(frozen=True)
class Setup:
    n: int = 2
    m: int = 4
    weight_bytes: int = 2  # frozen weights and activations (bf16 on GPUs)
    logits_bytes: int = 4  # logits, their gradients and AdamW states
    optimizer_states: int = 2  # AdamW: exp_avg, exp_avg_sq
    tensor: int = 1
    pipeline: int = 1
    data: int = 1  # does not change per-rank memory: logits are replicated over DP
    micro_batch: int = 1
    seq_len: int = 4096
    microbatches: int = 1  # per optimizer step (gradient accumulation); bounds the micro-batches in flight
    recompute: bool = False  # full activation recompute, per layer
    flash_attention: bool = True  # False on CPU (eager attention keeps the H x s x s softmax)
    sequence_parallel: bool = False


MEMORY_ITEMS = ("parameters", "logits", "logits_grads", "optimizer_states", "soft_mask", "activations", "loss_logits")


@dataclass(frozen=True)
class StageMemory:
    """Bytes on each rank of one pipeline stage."""

    stage: int
    layers: int
    in_flight: int  # micro-batches whose activations are held
    masked_weights: int
    param_count: int  # frozen weights (what ``meta_proof`` checks against the built model)
    logit_count: int
    largest_masked: int  # weights of the largest masked linear shard (megatron's fused fc1 or QKV)
    parameters: float
    logits: float
    logits_grads: float
    optimizer_states: float
    soft_mask: float
    activations: float
    loss_logits: float

    @property
    def total(self) -> float:
        return sum(getattr(self, k) for k in MEMORY_ITEMS)


def check_layout(dims: ModelDims, setup: Setup) -> None:
    """Raise ValueError naming what breaks when the model cannot be split this way."""
    t, p, m = setup.tensor, setup.pipeline, setup.m
    if dims.heads % t or dims.kv_heads % t:
        choices = [d for d in range(1, dims.kv_heads + 1) if dims.kv_heads % d == 0 and dims.heads % d == 0]
        raise ValueError(f"tensor parallel {t} must divide the {dims.heads} attention heads and {dims.kv_heads} "
                         f"KV heads; choose TP from {choices}")
    for what, size in (("intermediate size", dims.intermediate), ("vocabulary", dims.vocab)):
        if size % t:  # megatron splits them evenly over TP (its divide() asserts it)
            raise ValueError(f"tensor parallel {t} must divide the {what} ({size})")
    if dims.layers % p:
        raise ValueError(f"pipeline parallel {p} must divide the {dims.layers} layers")
    for name, (out, inp, split) in dims.linear_shapes().items():
        local_in = inp // t if split == "row" else inp
        if local_in % m:
            raise ValueError(f"{name}: its {local_in} input columns per TP rank are not a multiple of M={m} "
                             f"(groups of M must not straddle a shard boundary); use another TP")


def plan_memory(dims: ModelDims, setup: Setup) -> list[StageMemory]:
    """Per-rank bytes of each pipeline stage (all TP ranks of a stage hold the same)."""
    check_layout(dims, setup)
    t, p, s = setup.tensor, setup.pipeline, setup
    h, d, i = dims.hidden, dims.kv_dim, dims.intermediate
    layers = dims.layers // p
    tokens = s.micro_batch * s.seq_len
    patterns = math.comb(s.m, s.n)

    masked = layers * dims.masked_per_layer() // t  # exact: check_layout asserts every split divides
    largest_linear = max(dims.fused_linear_sizes()) // t

    replicated = 4 * h / (t if s.sequence_parallel else 1)
    split = (2 * h + 2 * d + 3 * i) / t
    scores = 0 if s.flash_attention else dims.heads * s.seq_len / t
    layer_act = s.weight_bytes * tokens * (replicated + split + scores)  # one layer, one micro-batch
    layer_input = s.weight_bytes * tokens * h / (t if s.sequence_parallel else 1)

    stages = []
    for stage in range(p):
        first, last = stage == 0, stage == p - 1
        norms = layers * 2 * h + (h if last else 0)  # replicated; with the final norm on the last stage
        params = layers * ((dims.masked_per_layer() + dims.bias_per_layer()) // t) + norms
        if first:
            params += dims.vocab * h // t
        if last and (p > 1 or not dims.tied_embeddings):
            params += dims.vocab * h // t
        in_flight = min(p - stage, s.microbatches) if p > 1 else 1
        if s.recompute:
            activations = in_flight * layers * layer_input + layer_act
        else:
            activations = in_flight * layers * layer_act
        logits = masked // s.m * patterns
        stages.append(StageMemory(
            stage=stage, layers=layers, in_flight=in_flight, masked_weights=masked, param_count=params,
            logit_count=logits, largest_masked=largest_linear,
            parameters=(params - norms) * s.weight_bytes + norms * NORM_BYTES,
            logits=logits * s.logits_bytes,
            logits_grads=logits * s.logits_bytes,
            optimizer_states=s.optimizer_states * logits * s.logits_bytes,
            soft_mask=masked * (4 * patterns / s.m + 2 * s.weight_bytes) + 4 * largest_linear,
            activations=activations,
            loss_logits=tokens * dims.vocab / t * (s.weight_bytes + 4 + 4) if last else 0.0,
        ))
    return stages


def peak(stages: Sequence[StageMemory]) -> StageMemory:
    return max(stages, key=lambda st: st.total)


# -------------------------------------------------------------------------------------------------
# Models and configs

# Dimensions of models whose config.json is not on this machine (hub names, cluster paths).
PRESETS: dict[str, ModelDims] = {
    "smollm2-135m": ModelDims(576, 1536, 30, 9, 3, 49152, tied_embeddings=True),
    "tiny-llama": ModelDims(64, 128, 2, 4, 2, 49152),  # tests/factories.py TINY_DIMS, SmolLM2's tokenizer
    "llama2-7b": ModelDims(4096, 11008, 32, 32, 32, 32000),
    # As loaded from their GGUF files (each has an output matrix of its own: untied).
    "qwen2.5-coder-0.5b": ModelDims(896, 4864, 24, 14, 2, 151936, qkv_bias=True),
    "qwen2.5-coder-1.5b": ModelDims(1536, 8960, 28, 12, 2, 151936, qkv_bias=True),
    # Nemotron-4 15B's dimensions as a LLaMA-family (SwiGLU, RMSNorm) model; Nemotron itself uses a
    # squared-ReLU MLP without the gate matrix (15.6 B parameters; this class has 20.4 B).
    "nemotron4-15b-class": ModelDims(6144, 24576, 32, 48, 8, 256000),
}
SOURCE_PRESETS = {"smollm2-135m": "smollm2-135m", "runs/tiny-llama": "tiny-llama",
                  "qwen2.5-coder-0.5b": "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b": "qwen2.5-coder-1.5b",
                  "meta-llama/Llama-2-7b-hf": "llama2-7b", "meta-llama/Llama-2-7b-chat-hf": "llama2-7b"}


def dims_from_hf_config(cfg: dict[str, Any]) -> ModelDims:
    return ModelDims(cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"],
                     cfg["num_attention_heads"], cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
                     cfg["vocab_size"], bool(cfg.get("tie_word_embeddings", False)),
                     qkv_bias=_has_qkv_bias(cfg.get("model_type")))


def _has_qkv_bias(model_type: Optional[str]) -> bool:
    from compressor.models.arch import ARCHITECTURES  # here: the models package imports torch

    return model_type in ARCHITECTURES and ARCHITECTURES[model_type].qkv_bias


def dims_for_source(source: str, preset: Optional[str] = None) -> ModelDims:
    """A preset by name, else the config.json of a local model folder, else a preset known for the source."""
    if preset:
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; known: {sorted(PRESETS)}")
        return PRESETS[preset]
    config_json = Path(source).expanduser() / "config.json"
    if config_json.is_file():
        return dims_from_hf_config(json.loads(config_json.read_text()))
    if source in SOURCE_PRESETS:
        return PRESETS[SOURCE_PRESETS[source]]
    raise ValueError(f"cannot find the dimensions of model {source!r} here: give a local HF folder, or "
                     f"--preset one of {sorted(PRESETS)}")


def setup_from_config(cfg: "DistributedLearnConfig", recompute: bool = False,
                      flash_attention: Optional[bool] = None, sequence_parallel: bool = False) -> Setup:
    """The Setup a distributed-learn config describes; flash attention defaults to on with GPUs."""
    nm, p, t = cfg.maskllm.sparsity, cfg.parallel, cfg.train
    return Setup(
        n=nm.n, m=nm.m,
        weight_bytes=DTYPE_BYTES[cfg.megatron_dtype], logits_bytes=DTYPE_BYTES[cfg.maskllm.logits_dtype],
        tensor=p.tensor, pipeline=p.pipeline, data=p.data,
        micro_batch=t.micro_batch_size, seq_len=t.seq_len, microbatches=cfg.num_microbatches,
        recompute=recompute,
        flash_attention=cfg.ray.gpus_per_worker > 0 if flash_attention is None else flash_attention,
        sequence_parallel=sequence_parallel,
    )


def _count(n: float) -> str:
    return f"{n / 1e9:.3f} B" if n >= 1e9 else f"{n / 1e6:.3f} M"


def format_plan(dims: ModelDims, setup: Setup, stages: Sequence[StageMemory]) -> str:
    s = setup
    lines = [
        f"model: hidden {dims.hidden}, intermediate {dims.intermediate}, {dims.layers} layers, {dims.heads} heads / "
        f"{dims.kv_heads} KV, vocab {dims.vocab}: {_count(dims.total_params())} parameters, "
        f"{_count(dims.layers * dims.masked_per_layer())} masked",
        f"layout: TP={s.tensor} PP={s.pipeline} DP={s.data} ({s.tensor * s.pipeline * s.data} ranks), {s.n}:{s.m}, "
        f"weights {s.weight_bytes} B, logits {s.logits_bytes} B, micro-batch {s.micro_batch} x {s.seq_len} tokens, "
        f"{s.microbatches} micro-batch(es) per step, recompute {'on' if s.recompute else 'off'}, "
        f"flash attention {'on' if s.flash_attention else 'off'}",
        "",
    ]
    top = peak(stages)
    unit, scale = ("GiB", GIB) if top.total >= GIB else ("MiB", 2**20)
    rows = [("stage (layers, in flight)", [f"{st.stage} ({st.layers}, {st.in_flight})" for st in stages]),
            ("masked weights / rank", [f"{st.masked_weights:,}" for st in stages])]
    labels = {"parameters": "parameters", "logits": "logits", "logits_grads": "logits grads",
              "optimizer_states": "AdamW states", "soft_mask": "soft mask", "activations": "activations",
              "loss_logits": "loss logits (CE)"}
    for key, label in labels.items():
        rows.append((f"{label} {unit}", [f"{getattr(st, key) / scale:.3f}" for st in stages]))
    rows.append((f"total {unit}", [f"{st.total / scale:.3f}" for st in stages]))
    width = max(len(r[0]) for r in rows)
    cols = [max(len(r[1][c]) for r in rows) for c in range(len(stages))]
    for label, values in rows:
        lines.append(f"{label:<{width}}  " + "  ".join(f"{v:>{w}}" for v, w in zip(values, cols)))
    lines += ["", f"peak per rank: {top.total / scale:.2f} {unit} (stage {top.stage}); add ~1-2 GiB CUDA context and "
              "10-15 % headroom"]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m compressor.parallel.memory_plan",
                                     description="Per-rank memory of distributed mask learning.")
    parser.add_argument("--config", required=True, help="a configs/distributed/*.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--preset", choices=sorted(PRESETS), help="model dimensions, when model.source is not local")
    parser.add_argument("--recompute", action="store_true", help="full activation recompute, per layer")
    parser.add_argument("--sequence-parallel", action="store_true")
    parser.add_argument("--flash-attention", action=argparse.BooleanOptionalAction, default=None,
                        help="default: on when ray.gpus_per_worker > 0")
    parser.add_argument("--prove", action="store_true",
                        help="also build every TP x PP rank on the meta device and check the plan and the HF layout "
                             "against it (compressor.parallel.meta_proof)")
    args = parser.parse_args(argv)
    from compressor.config.base import load_config
    from compressor.errors import CompressorError, ConfigError
    from compressor.parallel.config import DistributedLearnConfig

    try:
        cfg = load_config(DistributedLearnConfig, args.config, args.overrides)
        dims = dims_for_source(cfg.model.source, args.preset)
        setup = setup_from_config(cfg, args.recompute, args.flash_attention, args.sequence_parallel)
        stages = plan_memory(dims, setup)
    except (ValueError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_plan(dims, setup, stages))
    if args.prove:
        from compressor.parallel.meta_proof import prove_config

        try:
            proof = prove_config(cfg, args.preset)
        except (ValueError, CompressorError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print("\n" + proof.table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
