"""Which model to load, and how."""

from __future__ import annotations

from typing import Literal, Optional

from compressor.config.base import InputPath, StrictModel

DType = Literal["float32", "bfloat16", "float16"]


class ModelConfig(StrictModel):
    # "smollm2-135m" (embedded default), a local HF folder, a .gguf file, or a hub name.
    source: InputPath = "smollm2-135m"
    # Which .gguf inside a folder that holds several.
    gguf_file: Optional[str] = None
    dtype: DType = "float32"
    revision: Optional[str] = None
    trust_remote_code: bool = False
    # Keep weights on the meta device and read one decoder block at a time (models larger than memory).
    lazy: bool = False
