"""A megatron-core GPTModel for an HF LLaMA-family model, and the parallel state it lives in.

The model uses megatron's local layer spec (no Transformer Engine): RMSNorm, SwiGLU with a fused
gate/up projection, RoPE with the config's theta, grouped-query attention, no biases but Qwen2's
fused QKV bias, tied or untied embeddings, float32 on CPU. Each pipeline stage builds only its own
layers; its weights are read from the HF folder tensor by tensor (``megatron_convert``), so no rank
holds the whole model.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from compressor.parallel import megatron_cpu_shim
from compressor.parallel.megatron_convert import (
    Getter, LlamaDims, Shard, check_parallel_sizes, hf_to_megatron, stage_hf_names,
)
from compressor.utils.logging import get_logger

log = get_logger(__name__)
# megatron-core says so at import in every rank; the local spec needs neither.
warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")


@dataclass(frozen=True)
class Layout:
    """This rank's place in the TP x PP x DP layout (megatron's default rank order: tp fastest, then dp, then pp)."""

    tp_size: int
    tp_rank: int
    pp_size: int
    pp_rank: int
    dp_size: int
    dp_rank: int

    @property
    def shard(self) -> Shard:
        return Shard(self.tp_size, self.tp_rank, self.pp_size, self.pp_rank)

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    def describe(self) -> str:
        return f"tp {self.tp_rank}/{self.tp_size} pp {self.pp_rank}/{self.pp_size} dp {self.dp_rank}/{self.dp_size}"


def default_backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def init_distributed(timeout_minutes: int = 30) -> None:
    """torch.distributed from RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT (gloo on CPU, NCCL on GPU)."""
    missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise RuntimeError(f"cannot join the process group: {', '.join(missing)} not set in the environment "
                           "(the Ray driver, torchrun or the test's spawn sets them)")
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    megatron_cpu_shim.apply()  # a no-op with CUDA
    if not dist.is_initialized():
        from datetime import timedelta

        dist.init_process_group(default_backend(), timeout=timedelta(minutes=timeout_minutes))


def init_model_parallel(tp: int, pp: int, seed: int = 0) -> Layout:
    """megatron's parallel groups over the initialised world; world = tp * pp * dp."""
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    world = dist.get_world_size()
    if world % (tp * pp):
        raise ValueError(f"world size {world} is not a multiple of tensor_parallel {tp} x pipeline_parallel {pp}")
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    # gloo is already the default group's backend on CPU: no second set of gloo groups needed.
    ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                 create_gloo_process_groups=torch.cuda.is_available())
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    return current_layout()


def current_layout() -> Layout:
    from megatron.core import parallel_state as ps

    return Layout(tp_size=ps.get_tensor_model_parallel_world_size(), tp_rank=ps.get_tensor_model_parallel_rank(),
                  pp_size=ps.get_pipeline_model_parallel_world_size(), pp_rank=ps.get_pipeline_model_parallel_rank(),
                  dp_size=ps.get_data_parallel_world_size(), dp_rank=ps.get_data_parallel_rank())


def destroy_model_parallel() -> None:
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()


def transformer_config(dims: LlamaDims, tp: int, pp: int, dtype: torch.dtype = torch.float32) -> Any:
    from megatron.core.transformer.transformer_config import TransformerConfig

    check_parallel_sizes(dims, tp, pp)
    on_gpu = torch.cuda.is_available()
    return TransformerConfig(
        num_layers=dims.layers, hidden_size=dims.hidden, ffn_hidden_size=dims.ffn,
        num_attention_heads=dims.heads, num_query_groups=dims.kv_heads, kv_channels=dims.head_dim,
        normalization="RMSNorm", layernorm_epsilon=dims.norm_eps,
        gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False, add_qkv_bias=dims.qkv_bias,
        hidden_dropout=0.0, attention_dropout=0.0,
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, sequence_parallel=False,
        params_dtype=dtype, pipeline_dtype=dtype, bf16=dtype == torch.bfloat16,
        use_cpu_initialization=True, perform_initialization=False,  # the weights come from the HF folder
        # Fused kernels need CUDA (and Apex/TE); the unfused paths compute the same thing.
        bias_dropout_fusion=False, apply_rope_fusion=False, masked_softmax_fusion=False, persist_layer_norm=False,
        gradient_accumulation_fusion=False, bias_activation_fusion=False,
        # gloo has no batched p2p; on GPUs megatron's defaults stand.
        batch_p2p_comm=on_gpu, deallocate_pipeline_outputs=False,
    )


def build_gpt_model(dims: LlamaDims, layout: Layout, dtype: torch.dtype = torch.float32,
                    pg_collection: Any = None) -> torch.nn.Module:
    """This rank's stage of the GPTModel (random weights until ``load_hf_weights``).

    ``pg_collection``: megatron's process groups for the model (default: those of ``init_model_parallel``).
    """
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    config = transformer_config(dims, layout.tp_size, layout.pp_size, dtype)
    model = GPTModel(
        config, get_gpt_layer_local_spec(normalization="RMSNorm"), vocab_size=dims.vocab,
        max_sequence_length=dims.max_positions, pre_process=layout.is_first_stage,
        post_process=layout.is_last_stage, parallel_output=True,
        share_embeddings_and_output_weights=dims.tied, position_embedding_type="rope",
        rotary_percent=1.0, rotary_base=dims.rope_theta, pg_collection=pg_collection,
    )
    _check_layer_offset(model, dims, layout)
    for p in model.parameters():
        p.requires_grad_(False)  # the weights are frozen; only mask logits learn
    return model


def _check_layer_offset(model: torch.nn.Module, dims: LlamaDims, layout: Layout) -> None:
    # Our HF <-> megatron map assumes an even split of layers over stages; megatron numbers layers from 1.
    expected = layout.shard.layers(dims)
    numbers = [layer.layer_number - 1 for layer in model.decoder.layers]
    if numbers != list(expected):
        raise RuntimeError(f"megatron placed layers {numbers} on pipeline stage {layout.pp_rank}, the conversion "
                           f"expects {list(expected)}")


@torch.no_grad()
def load_hf_weights(model: torch.nn.Module, get: Getter, dims: LlamaDims, layout: Layout) -> None:
    """Copy this rank's shard of the HF weights into the stage model (every tensor must match exactly)."""
    converted = hf_to_megatron(get, dims, layout.shard)
    state = model.state_dict()
    expected = {k for k in state if not k.endswith("_extra_state")}
    if set(converted) != expected:
        missing, unexpected = sorted(expected - set(converted))[:4], sorted(set(converted) - expected)[:4]
        raise RuntimeError(f"HF -> megatron conversion mismatch on {layout.describe()}: missing {missing}, "
                           f"unexpected {unexpected}")
    for name, value in converted.items():
        target = state[name]
        if target.shape != value.shape:
            raise RuntimeError(f"{name}: megatron expects {tuple(target.shape)}, the HF shard is {tuple(value.shape)}")
        target.copy_(value.to(target.dtype))


def megatron_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The stage's tensors by local megatron name (no ``_extra_state`` entries)."""
    return {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state") and v is not None}


def open_hf_folder(folder: str | Path) -> tuple[Any, LlamaDims, Getter]:
    """(HF config, dimensions, lazy tensor getter) of a local HF model folder."""
    from compressor.models.lazy import WeightStore
    from compressor.models.loading import load_hf_config

    config = load_hf_config(Path(folder))
    dims = LlamaDims.from_hf_config(config)
    store = WeightStore(folder)
    return config, dims, lambda name: store.get(name, torch.float32)


def stage_weight_names(dims: LlamaDims, layout: Layout) -> list[str]:
    return list(stage_hf_names(dims, layout.shard))
