"""The `compressor learn` config: a training method (``method:``) on a streamed corpus."""

from __future__ import annotations

from typing import Annotated, Literal, Optional, Union

from pydantic import Field, PositiveFloat, PositiveInt, field_validator, model_validator

from compressor.calibration.config import CalibrationConfig
from compressor.config.base import InputPath, StrictModel
from compressor.data.config import DatasetConfig
from compressor.eval.config import EvalConfig
from compressor.methods.maskllm.config import MaskLLMConfig
from compressor.methods.maskllm.schedules import Schedule
from compressor.methods.registry import METHODS, SparseGPTOptions, SparseSwapsOptions
from compressor.methods.sparse_training.config import (
    BDWPMethod, DenseMethod, FixedMaskMethod, PDPMethod, SRSTEMethod,
)
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

    # none: random logits; a registered one-shot method: run it first (mask only, weights untouched);
    # file: masks.safetensors / a `compressor prune` run folder
    kind: str = "sparsegpt"
    path: Optional[InputPath] = None
    calibration: CalibrationConfig = CalibrationConfig()
    sparsegpt: SparseGPTOptions = SparseGPTOptions(update_weights=False)
    sparseswaps: SparseSwapsOptions = SparseSwapsOptions()

    @field_validator("kind")
    @classmethod
    def _known_kind(cls, kind: str) -> str:
        if kind not in ("none", "file") and kind not in METHODS:
            raise ValueError(f"prior.kind {kind!r} is none, file or a one-shot method ({', '.join(sorted(METHODS))})")
        return kind


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
    # Harness tasks scored with the perplexity at every curve point (accuracy against training tokens),
    # on their first eval_tasks_limit documents (None: all); the final evaluation runs evaluation.tasks.
    eval_tasks: list[str] = []
    eval_tasks_limit: Optional[PositiveInt] = None
    checkpoint_every: PositiveInt = 50
    keep_checkpoints: PositiveInt = 2
    # Every learning rate of the method times this factor over the steps (e.g. {start: 1, end: 0.1, kind:
    # cosine} for a long run), after warmup_steps of linear warmup; a function of the step, so a resumed run
    # continues the same schedule.
    lr_scale: Schedule = Schedule.constant(1.0)
    warmup_steps: int = Field(0, ge=0)

    def lr_scale_at(self, step: int) -> float:
        """The factor of optimizer step ``step`` (0-based)."""
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        return self.lr_scale.value_at(step - self.warmup_steps, self.steps - self.warmup_steps)

    @model_validator(mode="after")
    def _warmup_inside_the_run(self) -> "TrainConfig":
        if self.warmup_steps >= self.steps:
            raise ValueError(f"train.warmup_steps ({self.warmup_steps}) must be below train.steps ({self.steps})")
        if min(self.lr_scale.start, self.lr_scale.end) < 0:
            raise ValueError(f"train.lr_scale must stay >= 0, got start {self.lr_scale.start}, end {self.lr_scale.end}")
        return self

    @field_validator("eval_tasks")
    @classmethod
    def _harness_tasks(cls, names: list[str]) -> list[str]:
        from compressor.eval.tasks import resolve_tasks

        if any(s.harness is None for s in resolve_tasks(names)):  # unknown names raise, listing the known
            raise ValueError("train.eval_tasks holds harness tasks; the curve has the perplexity already")
        return names


class MaskLLMMethod(StrictModel):
    """MaskLLM: learned N:M masks (options in the ``maskllm:`` section; ``maskllm.train_weights`` also
    trains the weights)."""

    kind: Literal["maskllm"] = "maskllm"


# The training method, chosen by ``kind``; without a method section, MaskLLM (as every earlier config).
MethodConfig = Annotated[
    Union[MaskLLMMethod, FixedMaskMethod, SRSTEMethod, PDPMethod, BDWPMethod, DenseMethod],
    Field(discriminator="kind"),
]
# Methods that read ``prior`` (the mask they start from); the others take their start from model.source.
USES_PRIOR = ("maskllm", "fixed_mask")


class MaskLearningConfig(StrictModel):
    """What every mask-learning run shares, whichever trainer runs it."""

    model: ModelConfig = ModelConfig()
    method: MethodConfig = MaskLLMMethod()
    maskllm: MaskLLMConfig = MaskLLMConfig()
    init_logits: Optional[InputPath] = None  # transfer: logits.safetensors of an earlier run (overrides the prior)
    # MaskLLM with each layer's own N:M: a plan file (compressor/sparsity/plan.py), N:M levels only; it
    # replaces maskllm.sparsity, which then stays unset
    sparsity_plan: Optional[InputPath] = None
    targets: list[str] = [".*"]  # regexes on linear names
    ignore: list[str] = []
    train: TrainConfig = TrainConfig()
    evaluation: EvalConfig = EvalConfig(max_windows=16)  # hard-mask perplexity every train.eval_every steps
    # bfloat16: forward / backward products on the bf16 matrix units, frozen weights stored in bf16
    # (logits, optimizer state, the logits' gradient and trained weights stay float32)
    precision: Precision = Precision()

    @property
    def sparsity(self):
        """The sparsity the run ends with (MaskLLM's is ``maskllm.sparsity``; the dense control has none)."""
        if self.method.kind == "maskllm":
            return self.maskllm.sparsity
        return getattr(self.method, "sparsity", None)

    @model_validator(mode="after")
    def _sections_of_the_method(self) -> "MaskLearningConfig":
        if self.method.kind != "maskllm":
            if self.maskllm != MaskLLMConfig():  # the defaults are what a saved config.yaml holds
                raise ValueError(f"the maskllm section applies to method.kind maskllm only (method.kind is "
                                 f"{self.method.kind!r}): remove it, or set method.kind: maskllm")
            if self.init_logits is not None:
                raise ValueError(f"init_logits (MaskLLM logits to start from) does not apply to method.kind "
                                 f"{self.method.kind!r}; remove it")
            if self.sparsity_plan is not None:
                raise ValueError(f"sparsity_plan applies to method.kind maskllm only (method.kind is "
                                 f"{self.method.kind!r}); remove it, or prune with the plan (`compressor prune`)")
        elif self.sparsity_plan is not None and "sparsity" in self.maskllm.model_fields_set:
            raise ValueError(f"give maskllm.sparsity ({self.maskllm.sparsity}) or sparsity_plan "
                             f"({self.sparsity_plan!r}), not both: the plan holds every layer's level")
        return self


class DistillConfig(StrictModel):
    """Knowledge distillation: loss = (1 - weight) x next-token loss + weight x T^2 KL(teacher || model)."""

    weight: float = Field(0.0, ge=0.0, le=1.0)  # 0: the next-token loss alone; 1: the KL term alone
    temperature: PositiveFloat = 1.0
    # the teacher's model source; None: model.source as loaded (set it to the dense model when model.source is a
    # one-shot run's pruned model)
    teacher: Optional[InputPath] = None


class LearnConfig(MaskLearningConfig):
    """`compressor learn`: one process, or DeepSpeed data-parallel ranks."""

    prior: PriorConfig = PriorConfig()
    backend: Literal["single", "deepspeed"] = "single"
    deepspeed: DeepSpeedConfig = DeepSpeedConfig()
    distill: DistillConfig = DistillConfig()

    @model_validator(mode="after")
    def _prior_of_the_method(self) -> "LearnConfig":
        kind = self.method.kind
        if kind not in USES_PRIOR and self.prior != PriorConfig():  # the defaults: what a saved config.yaml holds
            raise ValueError(f"prior does not apply to method.kind {kind!r}, which starts from the weights of "
                             "model.source (to start from a one-shot run, set model.source to its model/ folder); "
                             "remove the prior section")
        if kind == "fixed_mask" and self.prior.kind == "none":
            raise ValueError("method.kind fixed_mask trains under a given mask: set prior.kind to a one-shot "
                             "method or to file (with prior.path: a `compressor prune` run folder or masks.safetensors)")
        if self.train.eval_tasks and self.backend == "deepspeed" and self.deepspeed.zero_stage == 3:
            raise ValueError("train.eval_tasks runs the harness on rank 0's model, which ZeRO-3 keeps partitioned; "
                             "use zero_stage 1 or 2, or score the tasks at the end (evaluation.tasks)")
        if kind != "maskllm" and self.backend == "deepspeed" and self.deepspeed.zero_stage == 3:
            raise ValueError(f"deepspeed.zero_stage 3 is supported for method.kind maskllm only; method.kind "
                             f"{kind!r} runs with zero_stage 0, 1 or 2")
        return self

    @model_validator(mode="after")
    def _zero3_samples_per_micro_batch(self) -> "LearnConfig":
        # ZeRO-3 partitions weights and logits; DeepSpeed gathers them only around a module's forward. A sample
        # held for a whole step is drawn outside the forward, and its surrogate backward would need every
        # layer's weights and logits gathered at once, defeating the partitioning.
        if (self.method.kind == "maskllm" and self.backend == "deepspeed" and self.deepspeed.zero_stage == 3
                and self.maskllm.sample_every != "micro_batch"):
            raise ValueError("deepspeed.zero_stage 3 needs maskllm.sample_every: micro_batch: ZeRO-3 partitions the "
                             "weights and mask logits, and the sample held for a whole step (sample_every: step, "
                             "the default) is drawn outside the model's forward, where they are not gathered; "
                             "set maskllm.sample_every: micro_batch, or use zero_stage 1 or 2")
        return self

    @model_validator(mode="after")
    def _zero3_partitioned_load(self) -> "LearnConfig":
        # The partitioned load builds every parameter in model.dtype and never holds a second model: frozen
        # weights held in bf16 beside float32 logits, and a whole teacher on every rank, do not fit that.
        ds = self.deepspeed
        if not (self.backend == "deepspeed" and ds.zero_stage == 3 and ds.zero3_partitioned_load):
            return self
        if self.precision.compute == "bfloat16" and not self.maskllm.train_weights:
            raise ValueError("precision.compute bfloat16 keeps the frozen weights in bf16, which the partitioned "
                             "ZeRO-3 load (deepspeed.zero3_partitioned_load, the default) does not do yet; set "
                             "deepspeed.zero3_partitioned_load: false (every rank loads the whole model first) or "
                             "precision.compute: float32")
        if self.distill.weight > 0:
            raise ValueError("distill needs the teacher whole on every rank, which the partitioned ZeRO-3 load "
                             "(deepspeed.zero3_partitioned_load, the default) avoids; set "
                             "deepspeed.zero3_partitioned_load: false or distill.weight: 0")
        return self
