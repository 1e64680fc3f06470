"""Analytic GEMM FLOPs: BDWP at 2:4 does a third less linear-layer GEMM work than dense training."""

import pytest

from compressor.methods.sparse_training import PassDensities, linear_gemm_flops


def test_bdwp_2of4_saves_a_third_of_the_gemm_flops():
    bdwp = PassDensities(0.5, 0.5, 1.0)
    flops = linear_gemm_flops([(4, 8), (8, 4)], tokens=10, densities=bdwp)
    dense = 2 * 10 * 64
    assert flops["dense_forward"] == dense and flops["forward"] == dense / 2
    assert flops["backward"] == pytest.approx(1.5 * dense) and flops["backward_vs_dense"] == 0.75
    assert flops["step_vs_dense"] == pytest.approx(2 / 3)


def test_densities_are_checked():
    with pytest.raises(ValueError, match="input_grad"):
        PassDensities(1.0, 0.0, 1.0)
