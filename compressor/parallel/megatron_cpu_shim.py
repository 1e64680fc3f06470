"""Run megatron-core on CPU (gloo) where it assumes CUDA. Every monkeypatch lives here.

megatron-core 0.16 reaches for CUDA in a handful of places on the code paths we use (GPTModel with
the local layer spec, tensor-parallel linears and mappings, the pipeline schedules, the RNG tracker):

- ``torch.cuda.current_device()`` as the device of new tensors (rotary embeddings, TP all-gathers,
  pipeline receive buffers): it returns the CPU device instead.
- ``torch.cuda.synchronize()`` after pipeline send/receive: a no-op (CPU ops are synchronous).
- The CUDA RNG tracker (``tensor_parallel.random``): ``model_parallel_cuda_manual_seed`` seeds, and
  ``get_cuda_rng_tracker().fork()`` swaps in, per-purpose CUDA generator states. On CPU they are CPU
  generator states, swapped in and out of torch's default CPU generator the same way.
- Hard-coded ``device="cuda"`` literals: the token counter of the schedules and the default causal
  mask of the unfused softmax. Those two modules see a ``torch`` whose tensor factories map a CUDA
  device to the CPU; nothing else of torch is touched.
- ``weight.data.cuda()`` when tied embeddings span pipeline stages: the copy stays on the CPU.

Not covered (they do not run on CPU at all): sequence parallelism, the distributed optimizer, fused
kernels (Transformer Engine, Apex); megatron's own optimizer would also need ``clip_grad=0``. We
train the mask logits with torch's AdamW and need none of them.

``apply()`` is idempotent, does nothing when CUDA is available, and checks the megatron-core version
this was written for: another patch release warns, another minor release raises (set
``COMPRESSOR_MEGATRON_SHIM_FORCE=1`` to try anyway).
"""

from __future__ import annotations

import contextlib
import os
import types
import warnings
from typing import Any, Callable

import torch

from compressor.utils.logging import get_logger

log = get_logger(__name__)

WRITTEN_FOR = (0, 16, 1)  # megatron-core (major, minor, patch)
FORCE_ENV = "COMPRESSOR_MEGATRON_SHIM_FORCE"
# Modules whose "cuda" device literals are mapped to the CPU (see _CpuDeviceTorch).
CUDA_LITERAL_MODULES = ("megatron.core.pipeline_parallel.schedules", "megatron.core.transformer.utils")
_FACTORIES = ("zeros", "ones", "empty", "full", "tensor", "arange")

_applied = False


class MegatronShimError(RuntimeError):
    """The installed megatron-core is not the release the CPU shim was written for."""


def is_needed() -> bool:
    return not torch.cuda.is_available()


def is_applied() -> bool:
    return _applied


def check_version(version: str) -> None:
    """Accept the release the shim was written for; warn on another patch; raise on another minor."""
    parts = tuple(int(p) for p in version.split(".")[:3] if p.isdigit())
    if parts == WRITTEN_FOR:
        return
    expected = ".".join(map(str, WRITTEN_FOR))
    message = (f"compressor's megatron-core CPU shim was written for megatron-core {expected}, but {version} "
               "is installed; the places it patches may have moved")
    if parts[:2] == WRITTEN_FOR[:2] or os.environ.get(FORCE_ENV) == "1":
        warnings.warn(message + " (trying anyway)", RuntimeWarning, stacklevel=3)
        return
    raise MegatronShimError(f"{message}. Install megatron-core=={expected} (pinned in setup.cfg), run on GPUs, "
                            f"or set {FORCE_ENV}=1 to try anyway.")


def apply() -> bool:
    """Patch megatron-core for CPU if CUDA is absent. Returns True if the shim is (now) active."""
    global _applied
    if _applied:
        return True
    if not is_needed():
        return False
    from megatron.core import package_info

    check_version(package_info.__version__)
    _patch_torch_cuda()
    _patch_rng_tracker()
    _patch_cuda_literals()
    _patch_tied_embedding_copy()
    _applied = True
    log.debug("megatron-core CPU shim applied")
    return True


# -- torch.cuda entry points ------------------------------------------------------------------------
def _cpu_device() -> torch.device:
    return torch.device("cpu")


def _patch_torch_cuda() -> None:
    # Without CUDA both functions raise; megatron only uses them to place tensors and to wait for kernels.
    torch.cuda.current_device = _cpu_device
    torch.cuda.synchronize = lambda device=None: None


# -- RNG tracker ------------------------------------------------------------------------------------
def _get_cpu_rng_state(device: Any = None, clone: bool = False, graph_safe: bool = False) -> torch.Tensor:
    return torch.get_rng_state()


def _set_cpu_rng_state(new_state: torch.Tensor, device: Any = -1, graph_safe: bool = False) -> None:
    torch.set_rng_state(new_state)


def _tracker_add_cpu(self, name: str, seed: int) -> None:
    """CudaRNGStatesTracker.add with a CPU generator state (same bookkeeping and errors)."""
    self._is_initialized = True
    if seed in self.seeds_:
        raise Exception(f"seed {seed} already exists")
    self.seeds_.add(seed)
    if name in self.states_:
        raise Exception(f"cuda rng state {name} already exists")
    self.states_[name] = torch.Generator().manual_seed(seed).get_state()


def _patch_rng_tracker() -> None:
    from megatron.core.tensor_parallel import random as mp_random

    # fork() reads and writes "the CUDA state" through these two module functions.
    mp_random._get_cuda_rng_state = _get_cpu_rng_state
    mp_random._set_cuda_rng_state = _set_cpu_rng_state
    mp_random.CudaRNGStatesTracker.add = _tracker_add_cpu


# -- device="cuda" literals -------------------------------------------------------------------------
def _on_cpu(device: Any) -> Any:
    if device is None:
        return None
    if isinstance(device, int) or torch.device(device).type == "cuda":
        return torch.device("cpu")
    return device


def _cpu_factory(factory: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    def make(*args: Any, **kwargs: Any) -> torch.Tensor:
        if "device" in kwargs:
            kwargs["device"] = _on_cpu(kwargs["device"])
        return factory(*args, **kwargs)

    make.__name__ = factory.__name__
    return make


class _CpuDeviceTorch(types.ModuleType):
    """``torch`` as seen by one megatron module: tensor factories put "cuda" tensors on the CPU."""

    def __init__(self) -> None:
        super().__init__("torch")
        for name in _FACTORIES:
            setattr(self, name, _cpu_factory(getattr(torch, name)))

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)


def _patch_cuda_literals() -> None:
    import importlib

    for name in CUDA_LITERAL_MODULES:
        module = importlib.import_module(name)
        if not hasattr(module, "torch"):
            raise MegatronShimError(f"{name} no longer imports torch; update compressor/parallel/megatron_cpu_shim.py")
        module.torch = _CpuDeviceTorch()


# -- tied embeddings across pipeline stages ---------------------------------------------------------
@contextlib.contextmanager
def _tensor_cuda_is_noop():
    original = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    try:
        yield
    finally:
        torch.Tensor.cuda = original


def _patch_tied_embedding_copy() -> None:
    from megatron.core.models.common.language_module.language_module import LanguageModule

    original = LanguageModule.setup_embeddings_and_output_layer

    def setup_embeddings_and_output_layer(self, *args: Any, **kwargs: Any) -> Any:
        # It moves the shared embedding with `.data.cuda()` before all-reducing it across stages.
        with _tensor_cuda_is_noop():
            return original(self, *args, **kwargs)

    LanguageModule.setup_embeddings_and_output_layer = setup_embeddings_and_output_layer
