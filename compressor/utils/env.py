"""What a report records about where it ran: package versions, host, git commit."""

from __future__ import annotations

import functools
import importlib.metadata
import os
import platform
import subprocess
from pathlib import Path

_PACKAGES = ("torch", "transformers", "safetensors", "pyarrow", "ray", "megatron-core", "deepspeed", "compressor")


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in _PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def git_commit() -> str | None:
    root = Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5, check=True
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def cpu_model() -> str:
    """The CPU's model name (Linux's /proc/cpuinfo; the platform's processor string elsewhere)."""
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def environment_info() -> dict:
    """Where a figure came from: a speed figure only compares with one from the same CPU and bf16 path."""
    import torch

    from compressor.precision import bf16_hardware

    return {
        "versions": package_versions(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),  # the widest SIMD torch's kernels use
        "bf16_hardware": bf16_hardware(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
        "git_commit": git_commit(),
    }


# The process peak from before the last restart_peak_rss(): VmHWM restarts from the current RSS there.
_PEAK_BEFORE_RESETS = 0


def _vm_hwm() -> int | None:
    """Linux's VmHWM in bytes: the high-water mark of this program's own memory since start or reset."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    return None


def peak_rss_bytes() -> int:
    """Peak resident set size of this process: Linux's VmHWM (kept across restart_peak_rss). ru_maxrss is the
    fallback elsewhere; on Linux it also holds the RSS of the parent at the fork before exec (a run
    started by a 3 GiB test process reported 3 GiB)."""
    hwm = _vm_hwm()
    if hwm is not None:
        return max(hwm, _PEAK_BEFORE_RESETS)
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # KiB on Linux (bytes on macOS)


def restart_peak_rss(release: bool = True) -> int | None:
    """The peak RSS since the last restart (or the start); then (``release``) freed heap blocks go back to
    the OS and the high-water mark restarts from the live memory (Linux: ``5`` to /proc/self/clear_refs), so
    that the next phase's own peak can be read. peak_rss_bytes() still returns the whole run's. None where
    the OS cannot restart the mark. The release walks the whole heap (``malloc_trim``); the restart is cheap."""
    global _PEAK_BEFORE_RESETS
    peak = _vm_hwm()  # read before the trim: VmHWM also counts the current RSS, which the trim lowers
    if peak is None:
        return None
    if release:
        release_freed_memory()
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
    except OSError:
        return None
    _PEAK_BEFORE_RESETS = max(_PEAK_BEFORE_RESETS, peak)
    return peak


def release_freed_memory() -> bool:
    """Hand the C heap's freed pages back to the OS (glibc ``malloc_trim``). Tokenizing a file leaves many
    small freed blocks that glibc keeps; without this they stay in the RSS of the whole run. False where
    the C library has no such call."""
    libc = _libc()
    return bool(libc.malloc_trim(0)) if libc is not None and hasattr(libc, "malloc_trim") else False


@functools.lru_cache(maxsize=1)
def _libc():
    """The C library, loaded once (None where it cannot be loaded)."""
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def flush_denormals() -> None:
    """Treat denormal floats as zero on the CPU (FTZ/DAZ) in this process. Mask learning at low
    temperature produces gradients and pattern weights far below 1e-38; as denormals they make CPU
    arithmetic up to ~100x slower (measured: steps from 13 s to minutes), and they are far below what
    float32 training can use. GPUs flush them in the kernels that matter."""
    import torch

    torch.set_flush_denormal(True)
