"""Builders for the small real models the tests run on."""

from __future__ import annotations

from pathlib import Path

from compressor.models.loading import local_folder, resolve_source
from compressor.models.random_init import PRESETS, save_random_model

TINY_DIMS = PRESETS["tiny"]


def smollm_folder() -> Path:
    """The embedded SmolLM2-135M as a cached HF folder (converted from GGUF on first use)."""
    return local_folder(resolve_source("smollm2-135m"))


def make_tiny_model(folder: Path, model_type: str = "llama", seed: int = 0, **overrides) -> Path:
    """A random LLaMA-family model with SmolLM2's tokenizer, saved as an HF folder."""
    return save_random_model(folder, "tiny", model_type, seed, **overrides)


def make_tiny_qwen2(folder: Path, seed: int = 0, **overrides) -> Path:
    """A random Qwen2 (LLaMA with q/k/v biases, drawn non-zero) of the tiny preset's shape."""
    return save_random_model(folder, "tiny", "qwen2", seed, **overrides)
