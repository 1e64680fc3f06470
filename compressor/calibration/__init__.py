"""Calibration: run windows through a model block by block and accumulate per-layer input statistics."""

from compressor.calibration.stats import InputStats, StatsKind
from compressor.calibration.blocks import BlockInputs, capture_block_inputs, collect_block_stats, run_block

__all__ = ["InputStats", "StatsKind", "BlockInputs", "capture_block_inputs", "collect_block_stats", "run_block"]
