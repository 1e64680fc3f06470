"""What to evaluate on: non-overlapping windows of a held-out text (BENCHMARK.md: wiki.test.raw, 512)."""

from __future__ import annotations

from typing import Optional

from pydantic import PositiveInt

from compressor.config.base import StrictModel
from compressor.data.config import DatasetConfig


class EvalConfig(StrictModel):
    enabled: bool = True
    data: DatasetConfig = DatasetConfig(split="eval")
    seq_len: PositiveInt = 512
    max_windows: Optional[PositiveInt] = None  # a quick variant: only the first windows (reported as such)
    batch_size: PositiveInt = 4
    dense_baseline: bool = False  # also evaluate the model before pruning
