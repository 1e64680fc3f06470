"""Builders for the small real models the tests run on."""

from __future__ import annotations

from pathlib import Path

import torch

from compressor.models.loading import local_folder, resolve_source

TINY_DIMS = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
)


def smollm_folder() -> Path:
    """The embedded SmolLM2-135M as a cached HF folder (converted from GGUF on first use)."""
    return local_folder(resolve_source("smollm2-135m"))


def make_tiny_model(folder: Path, model_type: str = "llama", seed: int = 0, **overrides) -> Path:
    """A random LLaMA-family model with SmolLM2's tokenizer, saved as an HF folder."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm_folder())
    dims = {**TINY_DIMS, **overrides}
    config = AutoConfig.for_model(
        model_type, vocab_size=len(tokenizer), tie_word_embeddings=False, **dims
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
