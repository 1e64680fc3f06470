"""The config of distributed mask learning: megatron-core TP x PP x DP workers (placed by Ray)."""

from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import PositiveInt, field_validator, model_validator

from compressor.config.base import InputPath, StrictModel
from compressor.methods.registry import METHODS
from compressor.parallel.ray_config import RayWorkersConfig
from compressor.training.config import FilePriorRule, MaskLearningConfig


class DistributedPriorConfig(FilePriorRule):
    """Where the initial logits come from: random, or the masks of an earlier run."""

    kind: Literal["none", "file"] = "none"
    path: Optional[InputPath] = None  # masks.safetensors, or a `compressor prune` / `compressor learn` run folder

    @field_validator("kind", mode="before")
    @classmethod
    def _one_shot_needs_whole_model(cls, value: Any) -> Any:
        if value in METHODS:
            raise ValueError(
                f"prior.kind={value!r} runs a one-shot method, which needs the whole model in one process; run "
                f"`compressor prune` with method {value} first, then give its masks here with kind: file and "
                "path: <that run folder or its masks.safetensors>")
        return value


class ParallelConfig(StrictModel):
    """world_size = tensor x pipeline x data; give ``data`` or ``world_size`` (the other follows)."""

    tensor: PositiveInt = 1
    pipeline: PositiveInt = 1
    data: PositiveInt = 1
    world_size: PositiveInt = 1
    # Micro-batches of train.micro_batch_size per optimizer step and data-parallel rank (the 1F1B schedule
    # pipelines them; >= pipeline keeps every stage busy). None = train.grad_accum.
    micro_batches: Optional[PositiveInt] = None
    timeout_minutes: PositiveInt = 30  # collectives (and a rank stuck in one) fail after this

    @model_validator(mode="before")
    @classmethod
    def _derive_sizes(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        tp, pp = data.get("tensor", 1), data.get("pipeline", 1)
        if not (isinstance(tp, int) and isinstance(pp, int) and tp > 0 and pp > 0):
            return data  # the field validators name the bad value
        model = tp * pp
        world, dp = data.get("world_size"), data.get("data")
        if world is not None and dp is None:
            if not isinstance(world, int) or world < 1 or world % model:
                raise ValueError(f"parallel.world_size={world} is not a multiple of tensor ({tp}) x pipeline ({pp}) "
                                 f"= {model}; use a world size of {model}, {2 * model}, ... or change tensor/pipeline")
            data["data"] = world // model
        elif world is None:
            data["world_size"] = model * (dp if isinstance(dp, int) else 1)
        elif isinstance(dp, int) and world != model * dp:
            raise ValueError(f"parallel.world_size={world} != tensor ({tp}) x pipeline ({pp}) x data ({dp}) = "
                             f"{model * dp}; give only one of world_size and data")
        return data


class DistributedLearnConfig(MaskLearningConfig):
    """`compressor launch`: megatron-core TP x PP x DP ranks placed by Ray.

    ``targets`` / ``ignore`` match HF linear names; a fused megatron linear (q/k/v, gate/up) is selected
    whole or not at all.
    """

    prior: DistributedPriorConfig = DistributedPriorConfig()
    parallel: ParallelConfig = ParallelConfig()
    ray: RayWorkersConfig = RayWorkersConfig()

    @property
    def num_microbatches(self) -> int:
        return self.parallel.micro_batches or self.train.grad_accum

    @property
    def megatron_dtype(self) -> str:
        """The dtype of the megatron model's weights: megatron runs without autocast, so bf16 products need a
        bf16 model (the logits keep ``maskllm.logits_dtype``)."""
        return "bfloat16" if "bfloat16" in (self.model.dtype, self.precision.compute) else "float32"

    @model_validator(mode="after")
    def _check(self) -> "DistributedLearnConfig":
        p, t = self.parallel, self.train
        if p.micro_batches is not None and t.grad_accum not in (1, p.micro_batches):
            raise ValueError(f"parallel.micro_batches={p.micro_batches} and train.grad_accum={t.grad_accum} both set "
                             "the micro-batches per step; set only one of them")
        if self.method.kind != "maskllm":
            raise ValueError(f"method.kind {self.method.kind!r} is not supported by the distributed (megatron) "
                             "trainer, which learns MaskLLM masks; run it with `compressor learn` (single or deepspeed)")
        if t.eval_tasks:
            raise ValueError("train.eval_tasks is not supported by the distributed (megatron) trainer, whose curve "
                             "is the hard-mask perplexity; score tasks at the end (evaluation.tasks) or remove it")
        if self.maskllm.train_weights:
            raise ValueError("maskllm.train_weights is not supported by the distributed (megatron) trainer: "
                             "the weights stay frozen there; use backend deepspeed in `compressor learn` for it")
        if self.model.dtype == "float16":
            raise ValueError("model.dtype float16 is not supported by the megatron trainer; use float32 or bfloat16")
        if self.model.lazy:
            raise ValueError("model.lazy does not apply here: each rank reads only its own shard of the weights; "
                             "remove it")
        if t.seq_len < 2:
            raise ValueError("train.seq_len must be >= 2 (a window predicts its tokens 2..T from 1..T-1)")
        return self
