"""Random-weight LLaMA-family models with a real tokenizer, saved as HF folders.

For trying a pipeline in seconds (and for tests and benchmarks): the tokenizer of a real model, the
shape of your choice, random weights (biases too where the family has them: Qwen2's q/k/v). Presets
keep head counts TP-friendly (divisible by 2).

    python -m compressor.models.random_init runs/tiny-llama --preset tiny
    python -m compressor.models.random_init runs/tiny-qwen2 --preset tiny --model-type qwen2
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

BIAS_STD = 0.1
PRESETS: dict[str, dict[str, int]] = {
    # 2 layers, 4 heads / 2 KV heads: TP 1/2/4, PP 1/2; seconds per step on a laptop
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=512),
    # 4 layers, hidden 256: big enough that the decoder, not the embedding, sets the step time of TP/PP
    "small": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=4, max_position_embeddings=1024),
}


def save_random_model(folder: str | Path, preset: str = "tiny", model_type: str = "llama", seed: int = 0,
                      tokenizer_source: str = "smollm2-135m", **overrides: Any) -> Path:
    """Write an HF folder: ``tokenizer_source``'s tokenizer, a ``model_type`` model of the preset's
    shape (``overrides`` change single dimensions) with weights drawn from ``seed``; untied embeddings
    unless ``tie_word_embeddings=True`` is among the overrides."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from compressor.models.loading import local_folder, resolve_source

    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    tokenizer = AutoTokenizer.from_pretrained(local_folder(resolve_source(tokenizer_source)))
    dims = {**PRESETS[preset], **overrides}
    dims = {"tie_word_embeddings": False, **dims}  # untied unless asked: a lost LM head would otherwise not show
    config = AutoConfig.for_model(model_type, vocab_size=len(tokenizer), **dims)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # transformers starts biases at zero, where a lost or misplaced bias would not show
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.normal_(0.0, BIAS_STD)
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m compressor.models.random_init", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("output", help="folder to write")
    ap.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    ap.add_argument("--model-type", default="llama", help="llama, mistral, qwen2, qwen3")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    print(save_random_model(args.output, args.preset, args.model_type, args.seed))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
