"""The precision an evaluation runs in, whatever the model was pruned or trained in."""

from __future__ import annotations

import copy
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from compressor.errors import ConfigError
from compressor.models.loading import DTYPES
from compressor.utils.logging import get_logger

log = get_logger(__name__)


def model_dtype(model: nn.Module) -> torch.dtype:
    return next(p.dtype for p in model.parameters() if p.is_floating_point())


@contextmanager
def eval_precision(model: nn.Module, dtype: str) -> Iterator[nn.Module]:
    """``model`` in ``dtype``: itself when it already is; cast in place and back when ``dtype`` is wider
    (exact both ways); otherwise a cast copy, so that the run's own weights never lose precision."""
    target, current = DTYPES[dtype], model_dtype(model)
    if target == current:
        yield model
    elif any(hasattr(p, "ds_id") for p in model.parameters()):  # DeepSpeed ZeRO-3 holds the real weights apart
        raise ConfigError(f"evaluation.dtype {dtype} differs from the {str(current).removeprefix('torch.')} weights, "
                          "which DeepSpeed ZeRO-3 partitions and cannot cast; set evaluation.dtype to model.dtype")
    elif target.itemsize > current.itemsize:
        model.to(target)
        try:
            yield model
        finally:
            model.to(current)
    else:
        log.info("evaluating a %s copy of the %s model", dtype, str(current).removeprefix("torch."))
        yield copy.deepcopy(model).to(target)
