"""Which linears of a decoder get pruned: discovery, filtering and the per-layer plan."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Sequence

from torch import nn

from compressor.errors import UnsupportedArchitectureError
from compressor.models.arch import DecoderArch


@dataclass(frozen=True)
class LinearTarget:
    name: str  # full name in the model, e.g. "model.layers.3.mlp.down_proj"
    block: int
    rel: str  # name inside the block, e.g. "mlp.down_proj"
    group: str  # input group, e.g. "mlp_out"
    out_features: int
    in_features: int

    @property
    def layer_type(self) -> str:
        return DecoderArch.layer_type(self.rel)


def decoder_blocks(model: nn.Module, arch: DecoderArch) -> nn.ModuleList:
    return model.get_submodule(arch.blocks)


def block_prefix(arch: DecoderArch, index: int) -> str:
    return f"{arch.blocks}.{index}"


def _matches(name: str, patterns: Sequence[str]) -> bool:
    return any(re.fullmatch(p, name) for p in patterns)


def prunable_linears(
    model: nn.Module, arch: DecoderArch, targets: Sequence[str] = (".*",), ignore: Sequence[str] = ()
) -> list[LinearTarget]:
    """The decoder linears to prune, block by block in the adapter's order.

    ``targets`` and ``ignore`` are regular expressions matched against the whole name
    (e.g. ``".*down_proj"``, ``"model\\.layers\\.0\\..*"``). Embeddings and LM head are never included.
    """
    found: list[LinearTarget] = []
    for index, block in enumerate(decoder_blocks(model, arch)):
        for group in arch.input_groups:
            for rel in group.linears:
                try:
                    linear = block.get_submodule(rel)
                except AttributeError:
                    linear = None
                if not isinstance(linear, nn.Linear):
                    raise UnsupportedArchitectureError(
                        f"{block_prefix(arch, index)}.{rel} is missing or not an nn.Linear; the {arch.family} "
                        "adapter in compressor/models/arch.py does not match this model"
                    )
                name = f"{block_prefix(arch, index)}.{rel}"
                if _matches(name, targets) and not _matches(name, ignore):
                    found.append(
                        LinearTarget(name, index, rel, group.name, linear.out_features, linear.in_features)
                    )
    return found


def by_block(targets: Iterable[LinearTarget]) -> dict[int, list[LinearTarget]]:
    out: dict[int, list[LinearTarget]] = {}
    for t in targets:
        out.setdefault(t.block, []).append(t)
    return out
