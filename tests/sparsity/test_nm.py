import itertools
import math

import numpy as np
import pytest
import torch

from compressor.errors import NonFiniteError, SparsityPatternError
from compressor.sparsity import (
    NM,
    Unstructured,
    assert_nm,
    density,
    is_nm,
    mask_from_scores,
    nm_mask_from_scores,
    nm_patterns,
    pack_bits,
    parse_sparsity,
    pattern_index,
    patterns_to_mask,
    unpack_bits,
    unstructured_mask_from_scores,
)

NMS = [NM(1, 2), NM(1, 4), NM(2, 4), NM(3, 4), NM(2, 8), NM(4, 8), NM(1, 3)]


def test_nm_parse_forms():
    assert NM.parse("2:4") == NM(2, 4) == NM.parse((2, 4)) == NM.parse({"n": 2, "m": 4})
    assert str(NM(2, 4)) == "2:4" and NM(2, 4).density == 0.5
    for bad in ["4:4", "0:4", "5:4", "2-4", "a:b", (2,), {"n": 2}, (2.0, 4)]:
        with pytest.raises(ValueError):
            NM.parse(bad)


def test_parse_sparsity_types():
    assert parse_sparsity("2:4") == NM(2, 4)
    assert parse_sparsity(0.5) == Unstructured(0.5)
    for bad in [0.0, 1.0, -0.1, 1.5, True]:
        with pytest.raises(ValueError):
            parse_sparsity(bad)


@pytest.mark.parametrize("nm", NMS)
def test_nm_mask_keeps_top_n_per_group(nm):
    torch.manual_seed(0)
    scores = torch.randn(7, nm.m * 5)
    mask = nm_mask_from_scores(scores, nm)
    assert mask.dtype == torch.bool and mask.shape == scores.shape
    groups_s = scores.reshape(7, 5, nm.m)
    groups_m = mask.reshape(7, 5, nm.m)
    assert (groups_m.sum(-1) == nm.n).all()
    # every kept score is >= every pruned score of its group
    for r, g in itertools.product(range(7), range(5)):
        kept = groups_s[r, g][groups_m[r, g]]
        pruned = groups_s[r, g][~groups_m[r, g]]
        assert kept.min() >= pruned.max()
    assert is_nm(mask, nm) and density(mask) == pytest.approx(nm.density)


def test_nm_mask_errors():
    with pytest.raises(SparsityPatternError, match="not divisible by M=4"):
        nm_mask_from_scores(torch.randn(3, 6), NM(2, 4))
    scores = torch.randn(2, 8)
    scores[1, 3] = float("nan")
    with pytest.raises(NonFiniteError, match="NaN"):
        nm_mask_from_scores(scores, NM(2, 4))


def test_unstructured_masks():
    torch.manual_seed(0)
    scores = torch.randn(10, 40)
    row = unstructured_mask_from_scores(scores, 0.25, scope="row")
    assert (row.sum(1) == 30).all()
    # the pruned entries of each row are its 10 smallest
    for r in range(10):
        assert set(scores[r].argsort()[:10].tolist()) == set((~row[r]).nonzero().flatten().tolist())
    layer = unstructured_mask_from_scores(scores, 0.25, scope="layer")
    assert int((~layer).sum()) == 100
    assert scores[~layer].max() <= scores[layer].min()
    assert mask_from_scores(scores, Unstructured(0.25)).equal(row)


@pytest.mark.parametrize("nm", NMS)
def test_assert_nm_and_violations(nm):
    mask = nm_mask_from_scores(torch.randn(4, nm.m * 3), nm)
    assert_nm(mask, nm)
    broken = mask.clone()
    broken[2, :nm.m] = True  # a full group
    assert not is_nm(broken, nm)
    with pytest.raises(SparsityPatternError, match=f"1 of 12 groups break the {nm} pattern"):
        assert_nm(broken, nm, "w")
    # weights (not masks) are checked by their non-zeros
    w = torch.randn(4, nm.m * 3) * mask
    assert is_nm(w, nm)


@pytest.mark.parametrize("nm", NMS)
def test_patterns_enumerate_all_combinations(nm):
    p = nm_patterns(nm)
    assert p.shape == (math.comb(nm.m, nm.n), nm.m)
    assert (p.sum(1) == nm.n).all()
    assert len({tuple(r.tolist()) for r in p}) == p.shape[0]  # distinct
    expected = [tuple(r) for r in itertools.combinations(range(nm.m), nm.n)]
    assert [tuple(r.nonzero().flatten().tolist()) for r in p] == expected


@pytest.mark.parametrize("nm", NMS)
def test_pattern_index_round_trip(nm):
    torch.manual_seed(1)
    c = math.comb(nm.m, nm.n)
    index = torch.randint(0, c, (5, 6))
    mask = patterns_to_mask(index, nm)
    assert mask.shape == (5, 6 * nm.m) and is_nm(mask, nm)
    assert pattern_index(mask, nm).equal(index)


def test_pattern_index_rejects_inexact_masks():
    mask = torch.tensor([[True, False, False, False]])
    with pytest.raises(SparsityPatternError, match="exactly 2 of 4"):
        pattern_index(mask, NM(2, 4))


@pytest.mark.parametrize("k", [1, 7, 8, 9, 16, 33, 576])
def test_pack_bits_matches_numpy_little_endian(k):
    rng = np.random.default_rng(k)
    mask = rng.random((3, 5, k)) < 0.5
    packed = pack_bits(torch.from_numpy(mask))
    reference = np.packbits(mask, axis=-1, bitorder="little")
    assert packed.dtype == torch.uint8
    np.testing.assert_array_equal(packed.numpy(), reference)
    assert unpack_bits(packed, k).numpy().tolist() == mask.tolist()


def test_unpack_bits_checks_width():
    with pytest.raises(ValueError, match="cannot hold"):
        unpack_bits(torch.zeros(2, 1, dtype=torch.uint8), 9)
    with pytest.raises(ValueError, match="uint8"):
        unpack_bits(torch.zeros(2, 1, dtype=torch.int32), 8)
