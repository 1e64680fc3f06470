from fractions import Fraction

import numpy as np
import pytest
import torch

from compressor.search.levels import LevelSet, SearchSpace
from compressor.search.owl import OWL_GRID, block_wanda_scores, outlier_ratios, owl_grid, owl_levels, owl_sparsities
from compressor.sparsity import NM, Unstructured
from compressor.sparsity.plan import SparsityPlan


def test_outlier_ratio_by_hand():
    # mean 2: above 5 x 2 = 10 is only the 11 (1 of 10); above 3 x 2 = 6 too
    block0 = [torch.tensor([[1.0, 1, 1, 1, 1]]), torch.tensor([[1.0, 1, 1, 1, 11]])]
    assert outlier_ratios(block0, [5.0, 3.0, 12.0]) == [0.1, 0.1, 0.0]
    # mean 4: above 3 x 4 = 12 are the two 16s
    block2 = [torch.tensor([1.0] * 8 + [16.0, 16.0])]
    assert outlier_ratios(block2, [5.0, 3.0]) == [0.0, 0.2]


def test_wanda_scores_feed_the_ratio():
    w = torch.tensor([[1.0, -2.0], [0.5, 4.0]])
    scores = block_wanda_scores([w], [torch.tensor([4.0, 1.0])])  # |W| * ||X||, norms 2 and 1
    assert scores[0].tolist() == [[2.0, 2.0], [1.0, 4.0]]


def test_owl_sparsities_by_hand():
    # ratios 0.1, 0.0, 0.05 -> z = 1, 0, 0.5 -> -2 lambda z = -0.16, 0, -0.08, shifted to average 0.7
    s = owl_sparsities([0.1, 0.0, 0.05], [1, 1, 1], 0.7, 0.08)
    assert s == pytest.approx([0.62, 0.78, 0.70])
    # by parameter count: block 0 twice the size -> weighted mean of the unshifted values is -0.1
    s = owl_sparsities([0.1, 0.0, 0.05], [2, 1, 1], 0.7, 0.08)
    assert s == pytest.approx([0.64, 0.80, 0.72]) and np.dot([2, 1, 1], s) / 4 == pytest.approx(0.7)


SHAPES = {f"model.layers.{b}.{r}": s for b in range(3)
          for r, s in [("self_attn.q_proj", (64, 64)), ("self_attn.k_proj", (32, 64)), ("mlp.down_proj", (64, 128))]}
BLOCK_OF = {n: n.rsplit(".", 2)[0] for n in SHAPES}


def test_unstructured_owl_levels_are_exact_short_decimals():
    blocks = {"model.layers.0": 0.62, "model.layers.1": 0.78, "model.layers.2": 0.70}
    space = SearchSpace.build(SHAPES, OWL_GRID, 0.7)
    levels = owl_levels(blocks, BLOCK_OF, space)
    assert levels["model.layers.0.self_attn.q_proj"] == Unstructured(0.62)
    assert levels["model.layers.1.mlp.down_proj"] == Unstructured(0.78)
    plan = SparsityPlan.from_levels(levels, target=0.7)
    assert plan.resolve(SHAPES).average == Fraction(7, 10)


def test_nm_owl_variant_snaps_to_the_level_set_at_the_exact_average():
    # 0.75 +- 0.125 per block onto N:8: blocks land on 3:8, 1:8, 2:8 exactly
    blocks = {"model.layers.0": 0.625, "model.layers.1": 0.875, "model.layers.2": 0.75}
    space = SearchSpace.build(SHAPES, LevelSet.nm(8), 0.75)
    levels = owl_levels(blocks, BLOCK_OF, space)
    assert [levels[f"model.layers.{b}.mlp.down_proj"] for b in range(3)] == [NM(3, 8), NM(1, 8), NM(2, 8)]
    # off-grid sparsities still give the exact average
    blocks = {"model.layers.0": 0.70, "model.layers.1": 0.81, "model.layers.2": 0.74}  # weighted mean 0.75
    levels = owl_levels(blocks, BLOCK_OF, space)
    assert SparsityPlan.from_levels(levels, 0.75).resolve(SHAPES).average == Fraction(3, 4)


def test_owl_grid_covers_m_and_lambda_and_drops_impossible_spreads():
    ratios = {5.0: {"b0": 0.1, "b1": 0.0}, 7.0: {"b0": 0.05, "b1": 0.02}}
    grid = owl_grid(ratios, {"b0": 10, "b1": 10}, target=0.9, lambdas=(0.05, 0.2))
    assert [(g.m, g.lam) for g in grid] == [(5.0, 0.05), (7.0, 0.05)]  # 0.9 + 0.2 leaves (0, 1)
    assert grid[0].block_sparsity == pytest.approx({"b0": 0.85, "b1": 0.95})
