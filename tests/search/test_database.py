"""The level database: nested Wanda masks, entries that match their levels, and a build that resumes."""

import pytest
import torch

from compressor.methods.wanda import wanda_mask, wanda_scores
from compressor.search.database import load_owl_ratios, nested_mask, score_ranks
from compressor.search.levels import LevelSet
from compressor.sparsity import is_nm
from tests.search.helpers import tiny_database


@pytest.mark.parametrize("levels, m", [(LevelSet.unstructured(0.3, 0.9, 0.15), None), (LevelSet.nm(8), 8)])
def test_nested_masks_are_wandas_masks_and_nested(levels, m):
    g = torch.Generator().manual_seed(0)
    weight, norms = torch.randn(24, 64, generator=g), torch.rand(64, generator=g)
    rank = score_ranks(wanda_scores(weight, norms), m)
    previous = None
    for level in levels.levels:
        mask = nested_mask(rank, level)
        assert torch.equal(mask, wanda_mask(weight, norms, level)), level
        if previous is not None:
            assert not (mask & ~previous).any(), f"{level} keeps a weight the denser level pruned"
        previous = mask


def test_entries_match_their_levels_and_the_build_resumes(tmp_path, tiny_llama_dir, text_file):
    levels = LevelSet.nm(4)  # 3:4, 2:4, 1:4
    loaded, targets, db, built = tiny_database(tmp_path / "db", tiny_llama_dir, text_file, "sparsegpt", levels)
    assert built.solved == len(targets) * 3 and not db.missing([t.name for t in targets])
    for t in targets[:3]:
        dense = loaded.model.get_submodule(t.name).weight.detach()
        for k, level in enumerate(levels.levels):
            w = db.weight(t.name, k, dense)
            assert is_nm(w, level) and (w != 0).float().mean() > level.density - 0.05
            assert not torch.equal(w, dense * (w != 0)), "SparseGPT's entries hold updated weights"
    assert set(load_owl_ratios(db)) == {"model.layers.0", "model.layers.1"}

    inodes = {p: p.stat().st_ino for p in (tmp_path / "db").rglob("*.safetensors")}
    victim = db.entry(targets[4].name, 1)
    victim.unlink()
    _, _, _, again = tiny_database(tmp_path / "db", tiny_llama_dir, text_file, "sparsegpt", levels)
    assert again.solved == 1 and victim.is_file()
    for path, inode in inodes.items():
        if path != victim:
            assert path.stat().st_ino == inode, f"{path} was recomputed"
    _, _, _, done = tiny_database(tmp_path / "db", tiny_llama_dir, text_file, "sparsegpt", levels)
    assert done.solved == 0 and done.blocks == 0  # nothing missing: not even the calibration pass runs


def test_wanda_database_is_one_rank_file_per_layer(tmp_path, tiny_llama_dir, text_file):
    levels = LevelSet.unstructured(0.5, 0.9, 0.1)
    loaded, targets, db, built = tiny_database(tmp_path / "db", tiny_llama_dir, text_file, "wanda", levels)
    assert built.solved == len(targets)
    assert sorted(p.name for p in (tmp_path / "db" / targets[0].name).iterdir()) == ["wanda-rank.safetensors"]
    dense = loaded.model.get_submodule(targets[0].name).weight.detach()
    kept = [(db.weight(targets[0].name, k, dense) != 0) for k in range(len(levels))]
    for k, level in enumerate(levels.levels):
        assert int((~kept[k]).sum(dim=1)[0]) == int(dense.shape[1] * level.sparsity)
    assert all(not (b & ~a).any() for a, b in zip(kept, kept[1:]))
