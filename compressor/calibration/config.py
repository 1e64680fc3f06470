"""Which calibration windows a one-shot method sees (BENCHMARK.md: 128 x 512 tokens, seed 0)."""

from __future__ import annotations

from pydantic import NonNegativeInt, PositiveInt

from compressor.config.base import StrictModel
from compressor.data.config import DatasetConfig


class CalibrationConfig(StrictModel):
    data: DatasetConfig = DatasetConfig()
    num_windows: PositiveInt = 128
    seq_len: PositiveInt = 512
    seed: NonNegativeInt = 0
    batch_size: PositiveInt = 8  # windows per forward pass
