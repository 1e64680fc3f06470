"""Distributed checkpoints of the mask logits reshard: saved at TP=2, they load at TP=1, TP=4 and PP=2."""

from __future__ import annotations

import pytest
import torch
from torch.multiprocessing import ProcessRaisedException

from tests.parallel.megatron_workers import checkpoint_load, checkpoint_save, run_ranks, save_tiny_hf

pytest.importorskip("megatron.core")
pytestmark = pytest.mark.distributed
SEED = 11


@pytest.fixture(scope="module")
def saved_at_tp2(tmp_path_factory):
    """A 4-KV-head tiny LLaMA (TP up to 4) and a checkpoint written by two TP ranks after one AdamW step."""
    root = tmp_path_factory.mktemp("ckpt")
    folder = save_tiny_hf(root / "hf", tied=False, num_key_value_heads=4)
    windows = torch.randint(0, 96, (2, 2, 12), generator=torch.Generator().manual_seed(2))
    run_ranks(checkpoint_save, 2, str(folder), str(root), 2, 1, windows, SEED)
    return folder, root, torch.load(root / "result.pt", weights_only=False)


@pytest.mark.parametrize("tp,pp", [(1, 1), (4, 1), (1, 2)], ids=["tp1", "tp4", "pp2"])
def test_checkpoint_saved_at_tp2_reloads_in_another_layout(saved_at_tp2, tmp_path, tp, pp):
    folder, root, saved = saved_at_tp2
    (tmp_path / "checkpoints").symlink_to(root / "checkpoints")
    run_ranks(checkpoint_load, tp * pp, str(folder), str(tmp_path), tp, pp, SEED)
    loaded = torch.load(tmp_path / "result.pt", weights_only=False)

    assert set(loaded["logits"]) == set(saved["logits"]) and len(saved["logits"]) == 14  # 7 linears x 2 layers
    for name, value in saved["logits"].items():
        assert not torch.equal(loaded["before"][name], value), name  # the load had something to do
        assert torch.equal(loaded["logits"][name], value), name
        assert torch.equal(loaded["exp_avg"][name], saved["exp_avg"][name]), name
    assert loaded["step"] == 1 and loaded["history"] == {"logs": [1], "evals": []}
    assert loaded["stream"] == {"position": 7}
    assert loaded["lr"] == 0.05  # AdamW hyper-parameters come back too


def test_checkpoint_refuses_another_data_parallel_size(saved_at_tp2, tmp_path):
    folder, root, _ = saved_at_tp2
    (tmp_path / "checkpoints").symlink_to(root / "checkpoints")
    with pytest.raises(ProcessRaisedException, match=r"saved with 1 data-parallel replicas.*parallel\.data=1"):
        run_ranks(checkpoint_load, 2, str(folder), str(tmp_path), 1, 1, SEED)  # TP=1 x DP=2
