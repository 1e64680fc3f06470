"""Sparse weight training: pure tensor math for the methods that train weights under N:M masks.

- ``fixed_mask``: the kept weights of a one-shot mask train, the pruned stay zero.
- ``srste``: SR-STE (Zhou et al. 2021): the magnitude N:M mask of the current weights, a straight-through
  gradient and the sparse-refined decay lambda_w (1 - mask) * W.
- ``pdp``: PDP (Cho et al. 2023): a soft mask sigmoid((w^2 - t^2) / tau) whose threshold t sits between
  the kept and the pruned magnitudes.
- ``bdwp``: bidirectional N:M training: N:M along the input dimension in the forward pass, along the
  output dimension for the input gradient, a dense weight gradient.
- ``flops``: analytic GEMM FLOPs of each method's forward and backward passes against dense.

The modules here are weight parametrizations (``torch.nn.utils.parametrize``) or, for BDWP, a reversible
swap of ``nn.Linear``; which layers they go on and when they are driven is the trainer's business
(``compressor.training.learners``).
"""

from compressor.methods.sparse_training.bdwp import BDWPLinear, bdwp_linear, bdwp_masks
from compressor.methods.sparse_training.fixed_mask import FixedMask
from compressor.methods.sparse_training.flops import PassDensities, linear_gemm_flops
from compressor.methods.sparse_training.pdp import PDPWeight, pdp_hard_mask, pdp_soft_mask, pdp_threshold_sq
from compressor.methods.sparse_training.srste import SRSTEWeight, sparse_refined_penalty, straight_through_mask

__all__ = ["BDWPLinear", "bdwp_linear", "bdwp_masks", "FixedMask", "PassDensities", "linear_gemm_flops",
           "PDPWeight", "pdp_hard_mask", "pdp_soft_mask", "pdp_threshold_sq", "SRSTEWeight",
           "sparse_refined_penalty", "straight_through_mask"]
