"""Numeric precision: the one dtype map, the ``precision`` setting every command shares, and what the
hardware offers.

``precision.compute`` is the dtype of the matrix products of forward and backward passes. bfloat16
runs them under autocast: weights that are updated keep float32 masters and the products run on the
CPU's bf16 units (AMX or AVX512-BF16; on GPUs their tensor cores); norms, softmax and losses stay in
float32. ``precision.statistics`` is how calibration statistics (Gram matrices, column norms) are
formed: float32 products summed in float64, or bfloat16 products summed in float64. Solvers (the
Hessian factor, the OBS sweep, mask logits, optimizer state) keep the precision they need whatever
is chosen. On a CPU without bf16 hardware (AVX2 only), torch's bf16 GEMM is a reference loop, about
100x slower than float32: there every bf16 product runs as a float32 GEMM of the same bf16 operands,
rounded back to bf16 (``bf16_products``): the numbers of a bf16 GEMM with float32 accumulation, at
float32's speed (logged).
"""

from __future__ import annotations

from contextlib import ExitStack, nullcontext
from functools import lru_cache
from typing import Any, ContextManager, Literal

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves, tree_map

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

    @property
    def uses_bf16(self) -> bool:
        return self.compute == "bfloat16" or self.statistics == "bfloat16"

    def autocast(self, device: torch.device | str = "cpu") -> ContextManager:
        """The context forward passes (and calibration statistics) run in: a no-op for float32; bf16
        autocast, and ``bf16_products`` where the hardware lacks bf16 units."""
        if not self.uses_bf16:
            return nullcontext()
        stack = ExitStack()
        if self.compute == "bfloat16":
            stack.enter_context(torch.autocast(device_type=torch.device(device).type, dtype=self.compute_dtype))
        stack.enter_context(bf16_products(device))
        return stack

    def products(self, device: torch.device | str = "cpu") -> ContextManager:
        """The context a backward pass runs in (outside autocast, its custom products may still be bf16)."""
        return bf16_products(device) if self.uses_bf16 else nullcontext()

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


# The products CPU autocast runs in bf16 (and their bf16-input forms), as Python sees them.
_PRODUCTS = frozenset({
    F.linear, F.bilinear, F.scaled_dot_product_attention, torch.matmul, torch.mm, torch.bmm, torch.addmm,
    torch.baddbmm, torch.addbmm, torch.einsum, torch.Tensor.matmul, torch.Tensor.__matmul__,
    torch.Tensor.__rmatmul__, torch.Tensor.mm, torch.Tensor.bmm, torch.Tensor.addmm, torch.Tensor.baddbmm,
})


def _float32_of_bf16(x: Any) -> Any:
    """A float32 tensor holding exactly the bf16 value autocast would feed the product."""
    if isinstance(x, torch.Tensor) and x.is_floating_point():
        return x.to(torch.bfloat16).to(torch.float32)
    return x


def _to_bf16(x: Any) -> Any:
    return x.to(torch.bfloat16) if isinstance(x, torch.Tensor) and x.is_floating_point() else x


class EmulatedBF16Products(TorchFunctionMode):
    """Runs each CPU matrix product that would take bf16 (bf16 operands, or autocast to bf16) as a float32
    GEMM of the bf16-rounded operands, rounding the result to bf16. Differentiable: gradients pass the
    same roundings, and the backward GEMMs run in float32."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _PRODUCTS and "out" not in kwargs:
            tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor) and t.is_floating_point()]
            on_cpu = bool(tensors) and all(t.device.type == "cpu" for t in tensors)
            autocast = torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
            if on_cpu and (all(t.dtype == torch.bfloat16 for t in tensors)
                           or (autocast and all(t.dtype != torch.float64 for t in tensors))):
                with torch.autocast("cpu", enabled=False):
                    out = func(*tree_map(_float32_of_bf16, args), **tree_map(_float32_of_bf16, kwargs))
                return tree_map(_to_bf16, out)
        return func(*args, **kwargs)


def bf16_products(device: torch.device | str = "cpu") -> ContextManager:
    """Where bf16 matrix products run: a no-op on bf16 hardware (and on GPUs); ``EmulatedBF16Products``
    on a CPU without it, where torch's own bf16 GEMM is a reference loop."""
    device = torch.device(device)
    if device.type != "cpu" or bf16_hardware(device) != "none":
        return nullcontext()
    return EmulatedBF16Products()


def log_precision(precision: Precision, what: str, device: torch.device | str = "cpu") -> None:
    """One line saying which path a step takes; a warning when bf16 has no hardware here."""
    hardware = bf16_hardware(device)
    if precision.uses_bf16 and hardware == "none":
        log.warning("%s: bfloat16 requested, but this CPU has no bf16 matrix hardware: each bf16 product runs "
                    "as a float32 GEMM of bf16-rounded operands (bf16's numbers at float32's speed; float32 "
                    "compute is as fast here and more precise)", what)
    else:
        log.info("%s: compute %s, statistics %s%s", what, precision.compute, precision.statistics,
                 f" (bf16 on {hardware})" if precision.uses_bf16 else "")
