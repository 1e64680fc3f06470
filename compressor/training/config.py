"""The `compressor learn` config: MaskLLM mask learning on a streamed corpus."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, PositiveInt, model_validator

from compressor.calibration.config import CalibrationConfig
from compressor.config.base import InputPath, StrictModel
from compressor.data.config import DatasetConfig
from compressor.eval.config import EvalConfig
from compressor.methods.maskllm.config import MaskLLMConfig
from compressor.methods.registry import SparseGPTOptions, SparseSwapsOptions
from compressor.models.config import ModelConfig
from compressor.precision import Precision
from compressor.training.backends import DeepSpeedConfig


class FilePriorRule(StrictModel):
    """A prior config whose ``path`` is given exactly when its ``kind`` is "file"."""

    @model_validator(mode="after")
    def _path_iff_file(self) -> "FilePriorRule":
        if (getattr(self, "kind") == "file") != (getattr(self, "path") is not None):
            raise ValueError("give prior.path exactly when prior.kind is 'file'")
        return self


class PriorConfig(FilePriorRule):
    """Where the initial logits come from."""

    # none: random logits; a one-shot method: run it first (mask only, weights untouched);
    # file: masks.safetensors / a `compressor prune` run folder
    kind: Literal["none", "magnitude", "wanda", "sparsegpt", "sparseswaps", "file"] = "sparsegpt"
    path: Optional[InputPath] = None
    calibration: CalibrationConfig = CalibrationConfig()
    sparsegpt: SparseGPTOptions = SparseGPTOptions(update_weights=False)
    sparseswaps: SparseSwapsOptions = SparseSwapsOptions()


class TrainConfig(StrictModel):
    data: DatasetConfig = DatasetConfig()
    seq_len: PositiveInt = 512
    micro_batch_size: PositiveInt = 4
    grad_accum: PositiveInt = 1
    steps: PositiveInt = 200
    seed: int = 0
    shuffle_buffer: int = Field(0, ge=0)  # windows; 0 = corpus order
    log_every: PositiveInt = 10
    eval_every: Optional[PositiveInt] = 50  # perplexity of the hard mask
    checkpoint_every: PositiveInt = 50
    keep_checkpoints: PositiveInt = 2


class MaskLearningConfig(StrictModel):
    """What every mask-learning run shares, whichever trainer runs it."""

    model: ModelConfig = ModelConfig()
    maskllm: MaskLLMConfig = MaskLLMConfig()
    init_logits: Optional[InputPath] = None  # transfer: logits.safetensors of an earlier run (overrides the prior)
    targets: list[str] = [".*"]  # regexes on linear names
    ignore: list[str] = []
    train: TrainConfig = TrainConfig()
    evaluation: EvalConfig = EvalConfig(max_windows=16)  # hard-mask perplexity every train.eval_every steps
    # bfloat16: forward / backward products on the bf16 matrix units, frozen weights stored in bf16
    # (logits, optimizer state, the logits' gradient and trained weights stay float32)
    precision: Precision = Precision()


class LearnConfig(MaskLearningConfig):
    """`compressor learn`: one process, or DeepSpeed data-parallel ranks."""

    prior: PriorConfig = PriorConfig()
    backend: Literal["single", "deepspeed"] = "single"
    deepspeed: DeepSpeedConfig = DeepSpeedConfig()

    @model_validator(mode="after")
    def _zero3_samples_per_micro_batch(self) -> "LearnConfig":
        # ZeRO-3 partitions weights and logits; DeepSpeed gathers them only around a module's forward. A sample
        # held for a whole step is drawn outside the forward, and its surrogate backward would need every
        # layer's weights and logits gathered at once, defeating the partitioning.
        if self.backend == "deepspeed" and self.deepspeed.zero_stage == 3 and self.maskllm.sample_every != "micro_batch":
            raise ValueError("deepspeed.zero_stage 3 needs maskllm.sample_every: micro_batch: ZeRO-3 partitions the "
                             "weights and mask logits, and the sample held for a whole step (sample_every: step, "
                             "the default) is drawn outside the model's forward, where they are not gathered; "
                             "set maskllm.sample_every: micro_batch, or use zero_stage 1 or 2")
        return self
