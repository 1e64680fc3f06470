"""MaskLLM (Fang et al. 2024): learnable N:M masks sampled with Gumbel-Softmax, weights frozen."""

from compressor.methods.maskllm.attach import (
    attach_masks, hold_samples, layer_seed, mask_memory_bytes, mask_stats, mask_train, prior_agreement, release_samples,
    remove_masks, set_noise, set_schedule_state, sparse_weight_regularizer, step_surrogate, store_frozen_weights,
)
from compressor.methods.maskllm.config import MaskLLMConfig
from compressor.methods.maskllm.mask import NMMaskParametrization
from compressor.methods.maskllm.schedules import Schedule

__all__ = ["attach_masks", "hold_samples", "release_samples", "step_surrogate", "layer_seed", "mask_memory_bytes",
           "mask_stats", "mask_train", "prior_agreement", "remove_masks", "set_noise", "set_schedule_state", "sparse_weight_regularizer",
           "store_frozen_weights",
           "MaskLLMConfig", "NMMaskParametrization", "Schedule"]
