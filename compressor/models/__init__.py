"""Model adapters: loading (HF folder, GGUF, hub, embedded default), architectures, lazy weights."""

from compressor.models.arch import ARCHITECTURES, DecoderArch, InputGroup, get_arch
from compressor.models.config import ModelConfig
from compressor.models.layers import LinearTarget, block_prefix, by_block, decoder_blocks, prunable_linears
from compressor.models.loading import LoadedModel, ModelSource, load_model, resolve_source

__all__ = [
    "ARCHITECTURES", "DecoderArch", "InputGroup", "get_arch", "ModelConfig", "LinearTarget",
    "block_prefix", "by_block", "decoder_blocks", "prunable_linears", "LoadedModel", "ModelSource",
    "load_model", "resolve_source",
]
