"""Numeric precision: the one dtype map, the ``precision`` setting every command shares, and what the
hardware offers.

``precision.compute`` is the dtype of the matrix products of forward and backward passes. bfloat16
runs them under autocast: weights that are updated keep float32 masters and the products run on the
CPU's bf16 units (AMX or AVX512-BF16; on GPUs their tensor cores); norms, softmax and losses stay in
float32. ``precision.statistics`` is how calibration statistics (Gram matrices, column norms) are
formed: float32 products summed in float64, or bfloat16 products summed in float64. Solvers (the
Hessian factor, the OBS sweep, mask logits, optimizer state) keep the precision they need whatever
is chosen. A machine without bf16 hardware runs the same numbers, only slower (logged).
"""

from __future__ import annotations

from contextlib import nullcontext
from functools import lru_cache
from typing import ContextManager, Literal

import torch

from compressor.config.base import StrictModel
from compressor.utils.logging import get_logger

log = get_logger(__name__)

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DType = Literal["float32", "bfloat16", "float16"]


def dtype_name(dtype: torch.dtype) -> str:
    return next(k for k, v in DTYPES.items() if v == dtype)


class Precision(StrictModel):
    compute: Literal["float32", "bfloat16"] = "float32"  # matrix products of forward / backward passes
    statistics: Literal["float64", "bfloat16"] = "float64"  # products behind calibration statistics

    @property
    def compute_dtype(self) -> torch.dtype:
        return DTYPES[self.compute]

    @property
    def statistics_dtype(self) -> torch.dtype:
        """The dtype calibration inputs are multiplied in (the sums are float64 either way)."""
        return torch.bfloat16 if self.statistics == "bfloat16" else torch.float32

    def autocast(self, device: torch.device | str = "cpu") -> ContextManager:
        """The context forward and backward passes run in (a no-op for float32)."""
        if self.compute == "float32":
            return nullcontext()
        device_type = torch.device(device).type
        return torch.autocast(device_type=device_type, dtype=self.compute_dtype)

    def describe(self, device: torch.device | str = "cpu") -> dict[str, str]:
        """What a report records: the settings and the hardware path they ran on."""
        return {"compute": self.compute, "statistics": self.statistics, "bf16_hardware": bf16_hardware(device)}


@lru_cache(maxsize=None)
def bf16_hardware(device: torch.device | str = "cpu") -> str:
    """"amx", "avx512_bf16", "cuda" (tensor cores) or "none" (bf16 products are emulated, slowly)."""
    device = torch.device(device)
    if device.type == "cuda":
        return "cuda" if torch.cuda.is_bf16_supported() else "none"
    cpu = torch.cpu
    if getattr(cpu, "_is_amx_tile_supported", lambda: False)():
        return "amx"
    if getattr(cpu, "_is_avx512_bf16_supported", lambda: False)():
        return "avx512_bf16"
    return "none"


def log_precision(precision: Precision, what: str, device: torch.device | str = "cpu") -> None:
    """One line saying which path a step takes; a warning when bf16 has no hardware here."""
    hardware = bf16_hardware(device)
    uses_bf16 = precision.compute == "bfloat16" or precision.statistics == "bfloat16"
    if uses_bf16 and hardware == "none":
        log.warning("%s: bfloat16 requested, but this machine has no bf16 matrix hardware: the results are "
                    "the same, the products are emulated and slower than float32", what)
    else:
        log.info("%s: compute %s, statistics %s%s", what, precision.compute, precision.statistics,
                 f" (bf16 on {hardware})" if uses_bf16 else "")
