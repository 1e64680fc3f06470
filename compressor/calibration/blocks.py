"""Block-by-block execution of a decoder over calibration windows.

The hidden states entering decoder block 0 are captured once (a stand-in block records its inputs
and stops the forward pass); afterwards every block is run on its own, so a pipeline can gather
statistics of block k, change its weights, and feed the changed outputs to block k + 1 while only
one block's activations are alive.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from compressor.calibration.stats import InputStats, StatsKind
from compressor.models.arch import DecoderArch, InputGroup
from compressor.models.layers import decoder_blocks
from compressor.precision import Precision


@dataclass
class BlockInputs:
    """The inputs of one decoder block for every calibration batch."""

    hidden: list[torch.Tensor]  # per batch: (B, T, hidden)
    kwargs: list[dict[str, Any]]  # per batch: attention mask, rotary embeddings, position ids

    def __len__(self) -> int:
        return len(self.hidden)

    def clone(self) -> "BlockInputs":
        return BlockInputs([h.clone() for h in self.hidden], list(self.kwargs))


class _Captured(Exception):
    pass


class _Catcher(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.hidden: torch.Tensor | None = None
        self.kwargs: dict[str, Any] = {}

    def forward(self, hidden_states: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        self.hidden, self.kwargs = hidden_states, kwargs
        raise _Captured


@torch.no_grad()
def capture_block_inputs(
    model: nn.Module, arch: DecoderArch, windows: torch.Tensor, batch_size: int
) -> BlockInputs:
    """Run the embedding part of ``model`` on ``windows`` (N, T) and return block 0's inputs."""
    blocks = decoder_blocks(model, arch)
    catcher = _Catcher(blocks[0])
    blocks[0] = catcher
    base = model.get_submodule(arch.blocks.rsplit(".", 1)[0])  # e.g. model.model: no LM head needed
    hidden, kwargs = [], []
    try:
        for start in range(0, windows.shape[0], batch_size):
            try:
                base(input_ids=windows[start : start + batch_size], use_cache=False)
            except _Captured:
                pass
            hidden.append(catcher.hidden)
            kwargs.append({k: v for k, v in catcher.kwargs.items() if k not in ("past_key_values", "use_cache")})
    finally:
        blocks[0] = catcher.inner
    return BlockInputs(hidden, kwargs)


@torch.no_grad()
def run_block(block: nn.Module, inputs: BlockInputs, desc: str | None = None,
              precision: Precision = Precision()) -> BlockInputs:
    """Outputs of ``block`` for every batch (in the dtype of its inputs): the next block's inputs."""
    out = []
    for hidden, kwargs in _batches(inputs, desc):
        result = _forward(block, hidden, kwargs, precision)
        result = result[0] if isinstance(result, tuple) else result
        out.append(result.to(hidden.dtype))
    return BlockInputs(out, inputs.kwargs)


def _batches(inputs: BlockInputs, desc: str | None):
    return tqdm(zip(inputs.hidden, inputs.kwargs), total=len(inputs), desc=desc, leave=False, disable=desc is None)


def _forward(block: nn.Module, hidden: torch.Tensor, kwargs: dict, precision: Precision):
    with precision.autocast(hidden.device):
        return block(hidden, use_cache=False, **kwargs)


class _StatsDone(Exception):
    pass


@torch.no_grad()
def collect_block_stats(
    block: nn.Module,
    inputs: BlockInputs,
    groups: Sequence[InputGroup],
    kind: StatsKind,
    prefix: str = "block",
    desc: str | None = None,
    precision: Precision = Precision(),
    outputs: bool = True,
) -> tuple[dict[str, InputStats], BlockInputs | None]:
    """Run ``block`` with hooks and return per-input-group statistics and the block's outputs.

    One hook per group, on its first linear: the linears of a group read the same tensor. With
    ``outputs=False`` each batch stops once the last group's input is seen (for LLaMA blocks: before
    down_proj, a quarter of the block's linear FLOPs) and no outputs are returned; ``groups`` must then be
    in execution order, as ``DecoderArch.input_groups`` are.
    """
    stats: dict[str, InputStats] = {}
    seen: list[str] = []  # groups whose hook fired in the current batch
    handles = []
    for i, group in enumerate(groups):
        linear = block.get_submodule(group.linears[0])
        stats[group.name] = InputStats.empty(kind, linear.in_features, precision.statistics_dtype)
        stop = not outputs and i == len(groups) - 1

        def hook(module, args, _s=stats[group.name], _what=f"{prefix}.{group.linears[0]} input", _stop=stop,
                 _name=group.name):
            _s.add(args[0], _what)
            seen.append(_name)
            if _stop:
                raise _StatsDone

        handles.append(linear.register_forward_pre_hook(hook))
    try:
        if outputs:
            return stats, run_block(block, inputs, desc, precision)
        for hidden, kwargs in _batches(inputs, desc):
            seen.clear()
            try:
                _forward(block, hidden, kwargs, precision)
            except _StatsDone:
                pass
            if len(seen) != len(groups):
                missed = sorted({g.name for g in groups} - set(seen))
                raise RuntimeError(f"{prefix}: input groups {missed} were not reached before the last group "
                                   f"{groups[-1].name!r}; list the groups in execution order")
        return stats, None
    finally:
        for h in handles:
            h.remove()
