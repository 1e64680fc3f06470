"""A level database on the tiny random LLaMA, for the database and scoring tests."""

from __future__ import annotations

from pathlib import Path

from compressor.data import calibration_windows, load_token_ids
from compressor.execution.base import InProcessExecutor
from compressor.methods.registry import SparseGPTOptions, WandaOptions
from compressor.models import load_model
from compressor.models.layers import prunable_linears
from compressor.search.database import Database, build_database
from compressor.search.levels import LevelSet
from compressor.search.owl import OWL_MS


def tiny_database(root: Path, model_dir: Path, text_file: Path, method: str, levels: LevelSet, executor=None):
    """(loaded model, its targets, the database, the build report): 4 windows of 32 tokens."""
    loaded = load_model(str(model_dir))
    targets = prunable_linears(loaded.model, loaded.arch)
    ids = calibration_windows(load_token_ids(str(text_file), loaded.tokenizer), 4, 32, 0)
    db = Database(str(root), method, levels.levels)
    options = SparseGPTOptions() if method == "sparsegpt" else WandaOptions()
    built = build_database(loaded.model, loaded.arch, targets, ids, db, options, SparseGPTOptions(),
                           executor or InProcessExecutor(), OWL_MS, batch_size=2)
    return loaded, targets, db, built
