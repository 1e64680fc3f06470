"""Architecture adapters: where the decoder blocks and prunable linears of each model family live.

A pipeline only asks an adapter for module paths, so a new LLaMA-like family is one entry here.
Linears are grouped by the input they read (q/k/v read the same hidden states), which lets the
calibration compute each input statistic once per group instead of once per linear.
"""

from __future__ import annotations

from dataclasses import dataclass

from compressor.errors import UnsupportedArchitectureError


@dataclass(frozen=True)
class InputGroup:
    """Linears of one decoder block that read the same input tensor."""

    name: str
    linears: tuple[str, ...]  # paths relative to the block, e.g. "self_attn.q_proj"


@dataclass(frozen=True)
class DecoderArch:
    family: str
    model_types: tuple[str, ...]
    input_groups: tuple[InputGroup, ...]
    blocks: str = "model.layers"
    embed_tokens: str = "model.embed_tokens"
    rotary_emb: str | None = "model.rotary_emb"
    final_norm: str = "model.norm"
    lm_head: str = "lm_head"
    # Biases on q, k and v (Qwen2; none on o or the MLP). They stay dense and are never pruned.
    qkv_bias: bool = False

    @property
    def linear_names(self) -> tuple[str, ...]:
        return tuple(name for group in self.input_groups for name in group.linears)

    def group_of(self, linear: str) -> InputGroup:
        for group in self.input_groups:
            if linear in group.linears:
                return group
        raise KeyError(linear)

    @staticmethod
    def layer_type(linear: str) -> str:
        """Short type used to aggregate reports: 'model.layers.3.self_attn.q_proj' -> 'q_proj'."""
        return linear.rsplit(".", 1)[-1]


_LLAMA_GROUPS = (
    InputGroup("attn_in", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    InputGroup("attn_out", ("self_attn.o_proj",)),
    InputGroup("mlp_in", ("mlp.gate_proj", "mlp.up_proj")),
    InputGroup("mlp_out", ("mlp.down_proj",)),
)

# LLaMA, Mistral, Qwen2 and Qwen3 share module names; they differ in biases, sliding windows and
# q/k norms, which live inside the blocks and do not change where the linears are.
ARCHITECTURES: dict[str, DecoderArch] = {
    arch.model_types[0]: arch
    for arch in (
        DecoderArch("llama", ("llama",), _LLAMA_GROUPS),
        DecoderArch("mistral", ("mistral",), _LLAMA_GROUPS),
        DecoderArch("qwen2", ("qwen2",), _LLAMA_GROUPS, qkv_bias=True),
        DecoderArch("qwen3", ("qwen3",), _LLAMA_GROUPS),
    )
}


def get_arch(config) -> DecoderArch:
    """The adapter for a transformers config, or an error that says what is supported."""
    model_type = getattr(config, "model_type", None)
    if model_type in ARCHITECTURES:
        return ARCHITECTURES[model_type]
    declared = ", ".join(getattr(config, "architectures", None) or []) or "no architectures declared"
    supported = ", ".join(sorted(ARCHITECTURES))
    raise UnsupportedArchitectureError(
        f"model type {model_type!r} ({declared}) is not a supported LLaMA-family causal LM; "
        f"supported model types: {supported}. Add an adapter in compressor/models/arch.py."
    )
