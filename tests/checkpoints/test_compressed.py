"""Pure pieces: one-tensor compression, logits -> masks, shard planning. No models, no files (mostly)."""

import itertools
from math import comb

import numpy as np
import pytest
import torch

from compressor.checkpoints.compressed import (
    compress_nm, compressed_keys, compressed_nbytes, decompress_nm, exact_nm_mask,
)
from compressor.checkpoints.logits import load_logits, logits_sparsity, logits_to_masks, save_logits
from compressor.checkpoints.sharded import make_entry, parse_size, plan_shards
from compressor.errors import CheckpointError, ConfigError, SparsityPatternError
from compressor.sparsity import NM, nm_mask_from_scores

NMS = [NM(2, 4), NM(1, 4), NM(4, 8), NM(3, 4), NM(1, 2)]


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32 if t.element_size() == 4 else torch.int16)


def sparse_weight(rows: int, cols: int, nm: NM, dtype=torch.float32, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    return (w * nm_mask_from_scores(w.abs(), nm)).to(dtype)


@pytest.mark.parametrize("nm", NMS, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_round_trip_is_exact_and_values_keep_row_order(nm, dtype):
    w = sparse_weight(6, 8 * nm.m, nm, dtype)
    parts = compress_nm(w, nm)
    assert parts["compressed"].shape == (6, 8 * nm.n) and parts["compressed"].dtype == dtype
    assert parts["shape"].tolist() == [[6], [8 * nm.m]] and parts["shape"].dtype == torch.int64
    back = decompress_nm(parts, nm)
    # bit for bit, with pruned entries as +0.0 (w * mask leaves -0.0 where w < 0)
    assert back.dtype == dtype and torch.equal(bits(back), bits(w + 0.0))
    # brute force: the kept values of each row, left to right
    for r in range(6):
        mask = np.unpackbits(parts["bitmask"][r].numpy(), bitorder="little")[: 8 * nm.m].astype(bool)
        assert torch.equal(parts["compressed"][r], w[r][torch.from_numpy(mask)])


def test_bitmask_matches_numpy_packbits_little():
    nm = NM(2, 4)
    w = sparse_weight(5, 44, nm)  # 44 columns: the last byte of each row is padded
    mask = exact_nm_mask(w, nm)
    expected = np.packbits(mask.numpy(), axis=-1, bitorder="little")
    got = compress_nm(w, nm)["bitmask"]
    assert got.shape == (5, 6) and got.dtype == torch.uint8
    assert np.array_equal(got.numpy(), expected)


def test_exact_mask_keeps_nonzeros_then_first_zeros():
    w = torch.tensor([[0.0, 0.0, 0.0, 5.0, 1.0, 2.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    mask = exact_nm_mask(w, NM(2, 4))
    assert mask.int().tolist() == [[1, 0, 0, 1, 1, 1, 0, 0, 1, 1, 0, 0]]
    assert torch.equal(decompress_nm(compress_nm(w, NM(2, 4)), NM(2, 4)), w)


def test_too_dense_or_misfit_weights_are_rejected_by_name():
    w = torch.ones(2, 8)
    with pytest.raises(SparsityPatternError, match="layer.q.*break the 2:4"):
        compress_nm(w, NM(2, 4), "layer.q")
    with pytest.raises(SparsityPatternError, match="not divisible by M=4"):
        compress_nm(torch.zeros(2, 6), NM(2, 4), "layer.k")
    with pytest.raises(SparsityPatternError, match="2-D"):
        compress_nm(torch.zeros(8), NM(2, 4))


def test_decompress_rejects_a_bitmask_that_breaks_the_pattern():
    nm = NM(2, 4)
    parts = compress_nm(sparse_weight(3, 16, nm), nm)
    bad = parts["bitmask"].clone()
    bad[1, 0] = 0b0000_0111  # first group of row 1 keeps 3; second keeps 0
    with pytest.raises(SparsityPatternError, match=r"w\.bitmask.*row 1, group 0 keeps 3"):
        decompress_nm({**parts, "bitmask": bad}, nm, "w.bitmask")
    with pytest.raises(SparsityPatternError, match="do not fit"):
        decompress_nm({**parts, "compressed": parts["compressed"][:, :-1]}, nm)
    with pytest.raises(SparsityPatternError, match="lacks its bitmask"):
        decompress_nm({"compressed": parts["compressed"], "shape": parts["shape"]}, nm)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_precision_2_4_is_0_5625_of_dense(dtype):
    w = sparse_weight(64, 256, NM(2, 4), dtype)
    parts = compress_nm(w, NM(2, 4))
    values_and_mask = parts["compressed"].nbytes + parts["bitmask"].nbytes
    assert values_and_mask / w.nbytes == 0.5625
    assert compressed_nbytes((64, 256), NM(2, 4), dtype) == values_and_mask + parts["shape"].nbytes


def test_compressed_keys_follow_compressed_tensors_names():
    assert compressed_keys("model.layers.0.mlp.up_proj.weight") == {
        "compressed": "model.layers.0.mlp.up_proj.compressed",
        "bitmask": "model.layers.0.mlp.up_proj.bitmask",
        "shape": "model.layers.0.mlp.up_proj.shape",
    }


@pytest.mark.parametrize("nm", [NM(2, 4), NM(1, 4), NM(2, 8)], ids=str)
def test_logits_argmax_matches_brute_force(tmp_path, nm):
    g = torch.Generator().manual_seed(1)
    logits = {"a.weight": torch.randn(3, 5, comb(nm.m, nm.n), generator=g)}
    save_logits(tmp_path / "logits.safetensors", logits, str(nm))
    loaded = load_logits(tmp_path / "logits.safetensors")
    assert logits_sparsity(tmp_path / "logits.safetensors") == nm
    assert torch.equal(loaded["a.weight"], logits["a.weight"])
    mask = logits_to_masks(loaded, nm)["a.weight"]
    combos = list(itertools.combinations(range(nm.m), nm.n))  # lexicographic, like nm_patterns
    for r, gi in itertools.product(range(3), range(5)):
        best = combos[int(logits["a.weight"][r, gi].argmax())]
        assert [i for i in range(nm.m) if mask[r, gi * nm.m + i]] == list(best)


def test_logits_files_are_checked(tmp_path):
    with pytest.raises(CheckpointError, match=r"\(out, in/4, 6\)"):
        save_logits(tmp_path / "x.safetensors", {"a": torch.zeros(2, 3, 5)}, "2:4")
    from safetensors.torch import save_file

    save_file({"a": torch.zeros(2, 3, 6)}, str(tmp_path / "y.safetensors"))
    with pytest.raises(CheckpointError, match="not a compressor logits file"):
        load_logits(tmp_path / "y.safetensors")
    (tmp_path / "z.safetensors").write_bytes(b"\x10\x00garbage")
    with pytest.raises(CheckpointError, match="cannot read logits file"):
        load_logits(tmp_path / "z.safetensors")


def test_parse_size():
    assert parse_size("500MB") == 500_000_000 and parse_size("2GiB") == 2 * 2**30
    assert parse_size("1.5 kb") == 1500 and parse_size(123) == 123
    for bad in ["", "MB", "-1MB", "0", "5 parsecs"]:
        with pytest.raises(ConfigError):
            parse_size(bad)


def test_plan_shards_respects_the_limit_and_keeps_order():
    entries = [make_entry(f"t{i}", (10, 8), torch.float32, None, False) for i in range(7)]  # 320 B each
    entries.insert(3, make_entry("big", (100, 8), torch.float32, None, False))  # 3200 B: alone
    plans = plan_shards(entries, 700)
    assert [[e.name for e in p.entries] for p in plans] == [["t0", "t1"], ["t2"], ["big"], ["t3", "t4"], ["t5", "t6"]]
    assert [p.file for p in plans][0] == "model-00001-of-00005.safetensors"
    assert all(p.stored_bytes <= 700 or len(p.entries) == 1 for p in plans)
    sparse = make_entry("w", (64, 256), torch.bfloat16, NM(2, 4), True)
    assert sparse.stored_bytes == compressed_nbytes((64, 256), NM(2, 4), torch.bfloat16)
    assert sparse.dense_bytes == 64 * 256 * 2
