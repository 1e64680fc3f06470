"""The checks of a run's final masks, one mask at a time: the N:M pattern (each layer at its own level with
a plan), the density, and the change from the step-0 masks (the report's ``pattern_ok``, ``density`` and
``mask_change_vs_start``)."""

from __future__ import annotations

from typing import Any, Mapping, Optional

import torch

from compressor.errors import SparsityPatternError
from compressor.sparsity import NM, is_nm, unpack_bits


class MaskChecks:
    """``add`` every final mask (weight name, (out, in) bool), then ``result()``; ``levels``: module name ->
    N:M of a sparsity plan; ``start_masks``: weight name -> packed bits of the step-0 masks."""

    def __init__(self, sparsity, levels: Optional[Mapping[str, NM]] = None,
                 start_masks: Optional[Mapping[str, torch.Tensor]] = None) -> None:
        self.sparsity, self.levels, self.start_masks = sparsity, levels, start_masks
        self.bad: list[str] = []
        self.changed = self.total = self.kept = 0

    def add(self, name: str, mask: torch.Tensor) -> None:
        if self.levels is not None:
            level = self.levels[name[: -len(".weight")]]
            if not is_nm(mask, level):
                self.bad.append(f"{name[: -len('.weight')]} ({level})")
        elif isinstance(self.sparsity, NM) and not is_nm(mask, self.sparsity):
            self.bad.append(name)
        if self.start_masks is not None and name in self.start_masks:
            self.changed += int((unpack_bits(self.start_masks[name], mask.shape[-1]) != mask).sum())
        self.total += mask.numel()
        self.kept += int(mask.sum())

    def error(self) -> Optional[SparsityPatternError]:
        if not self.bad:
            return None
        if self.levels is not None:
            return SparsityPatternError(f"the final masks break their plan's N:M in {len(self.bad)} layers, "
                                        f"e.g. {self.bad[0]}")
        return SparsityPatternError(f"the final masks break the {self.sparsity} pattern in {len(self.bad)} layers, "
                                    f"e.g. {self.bad[0]}")

    def result(self) -> dict[str, Any]:
        error = self.error()
        if error is not None:
            raise error
        nm = self.levels is not None or isinstance(self.sparsity, NM)  # every level of a plan is N:M
        change = self.changed / max(self.total, 1) if self.start_masks is not None else None
        return {"pattern_ok": True if nm else None, "density": self.kept / max(self.total, 1),
                "mask_change_vs_start": change}
