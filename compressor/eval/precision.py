"""The precision an evaluation runs in, whatever the model was pruned or trained in."""

from __future__ import annotations

import copy
from contextlib import contextmanager, nullcontext
from typing import Iterator

import torch
from torch import nn

from compressor.errors import ConfigError
from compressor.precision import DTYPES, bf16_products
from compressor.utils.logging import get_logger

log = get_logger(__name__)


def model_dtype(model: nn.Module) -> torch.dtype:
    return next(p.dtype for p in model.parameters() if p.is_floating_point())


def _floating(model: nn.Module) -> list[torch.Tensor]:
    return [t for t in [*model.parameters(), *model.buffers()] if t.is_floating_point()]


@contextmanager
def eval_precision(model: nn.Module, dtype: str) -> Iterator[nn.Module]:
    """``model`` in ``dtype``: itself when it already is; cast in place and back when ``dtype`` is at least
    as wide as every tensor (exact both ways; each tensor gets its own dtype back, so a model whose frozen
    weights are held in bf16 beside float32 ones stays as it was); otherwise a cast copy, so that the
    run's own weights never lose precision."""
    with bf16_products(next(model.parameters()).device) if dtype == "bfloat16" else nullcontext():
        with _in_dtype(model, dtype) as evaluated:
            yield evaluated


@contextmanager
def _in_dtype(model: nn.Module, dtype: str) -> Iterator[nn.Module]:
    target = DTYPES[dtype]
    tensors = _floating(model)
    if all(t.dtype == target for t in tensors):
        yield model
    elif any(hasattr(p, "ds_id") for p in model.parameters()):  # DeepSpeed ZeRO-3 holds the real weights apart
        current = str(model_dtype(model)).removeprefix("torch.")
        raise ConfigError(f"evaluation.dtype {dtype} differs from the {current} weights, which DeepSpeed ZeRO-3 "
                          "partitions and cannot cast; set evaluation.dtype to model.dtype")
    elif all(target.itemsize >= t.dtype.itemsize for t in tensors):
        saved = [(t, t.dtype) for t in tensors if t.dtype != target]
        for t, _ in saved:
            t.data = t.data.to(target)
        try:
            yield model
        finally:
            for t, original in saved:
                t.data = t.data.to(original)
    else:
        log.info("evaluating a %s copy of the %s model", dtype, str(model_dtype(model)).removeprefix("torch."))
        yield copy.deepcopy(model).to(target)
