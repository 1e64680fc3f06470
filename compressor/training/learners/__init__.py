"""Training methods behind the one training loop (see ``base.Learner``), chosen by ``method.kind``."""

from __future__ import annotations

from typing import Any, Mapping, Optional

import torch

from compressor.training.learners.base import FinalModel, Learner
from compressor.training.learners.maskllm import MaskLLMLearner
from compressor.training.learners.weights import LEARNERS, FixedMaskLearner


def make_learner(cfg, priors: Optional[Mapping[str, torch.Tensor]], levels: Optional[Mapping[str, Any]] = None
                 ) -> Learner:
    """The learner of ``cfg.method`` (a ``MaskLearningConfig``); ``priors``: the prior's masks, if any;
    ``levels``: MaskLLM's per-layer N:M of a sparsity plan (module name -> NM)."""
    kind = cfg.method.kind
    if kind == "maskllm":
        return MaskLLMLearner(cfg.maskllm, priors, seed=cfg.train.seed, init_logits=cfg.init_logits,
                              precision=cfg.precision, levels=levels)
    if kind == "fixed_mask":
        return FixedMaskLearner(cfg.method, priors)
    return LEARNERS[kind](cfg.method)


__all__ = ["FinalModel", "Learner", "MaskLLMLearner", "make_learner"]
