"""Checkpoint state as safetensors plus JSON: exact round trips, and files that cannot run code."""

from __future__ import annotations

import json
import os
import pickle

import pytest
import torch

from compressor.checkpoints.pieces import PieceReader, PieceSpec, pieces_file, write_pieces
from compressor.checkpoints.tree import load_tree, save_tree
from compressor.errors import CheckpointError
from compressor.training.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state


def _stepped_adamw() -> torch.optim.AdamW:
    w = torch.nn.Parameter(torch.randn(4, 3, generator=torch.Generator().manual_seed(0)))
    opt = torch.optim.AdamW([{"params": [w], "lr": 0.1}, {"params": [torch.nn.Parameter(torch.ones(2))], "lr": 0.2}])
    (w.square().sum()).backward()
    opt.step()
    return opt


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and a != a:
        return isinstance(b, float) and b != b
    return type(a) is type(b) and a == b


def test_round_trip_keeps_every_type(tmp_path):
    tree = {
        "optimizer": _stepped_adamw().state_dict(),  # int keys, tuple betas, None / bool options
        "rng": rng_state(),
        "nested": {1: [(), (1, "a"), {"__tree__": "not a tag"}], (2, 3): None},
        "floats": [0.5, float("inf"), float("-inf"), float("nan")],
        "tensors": [torch.empty(0, 3), torch.ones(2, dtype=torch.bfloat16), torch.tensor(True), torch.arange(3)[1:]],
    }
    save_tree(tmp_path / "state", tree)
    assert _same(tree, load_tree(tmp_path / "state"))


def test_optimizer_and_rng_resume_exactly(tmp_path):
    opt = _stepped_adamw()
    save_tree(tmp_path / "s", {"opt": opt.state_dict(), "rng": rng_state()})
    import random

    import numpy as np

    expected = (torch.rand(3), random.random(), np.random.rand())
    loaded = load_tree(tmp_path / "s")
    set_rng_state(loaded["rng"])
    assert (torch.rand(3).tolist(), random.random(), np.random.rand()) == (expected[0].tolist(), *expected[1:])
    twin = _stepped_adamw()
    twin.load_state_dict(loaded["opt"])
    assert _same(twin.state_dict(), opt.state_dict())


def test_objects_are_refused_when_saving(tmp_path):
    with pytest.raises(TypeError, match=r"s\.bad: a object cannot be stored"):
        save_tree(tmp_path / "s", {"bad": object()})


def test_unknown_entries_and_foreign_files_are_refused(tmp_path):
    save_tree(tmp_path / "s", {"a": 1})
    doc = json.loads((tmp_path / "s.json").read_text())
    doc["tree"]["a"] = {"__tree__": "module", "name": "os.system"}
    (tmp_path / "s.json").write_text(json.dumps(doc))
    with pytest.raises(CheckpointError, match="unknown entry"):
        load_tree(tmp_path / "s")
    (tmp_path / "s.json").write_text("not json")
    with pytest.raises(CheckpointError, match=r"s\.json is not valid JSON"):
        load_tree(tmp_path / "s")


class _Payload:
    """Unpickling this runs a program (it creates a file)."""

    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return os.system, (f"touch {self.target}",)


def test_a_crafted_pickle_in_a_checkpoint_is_refused_and_runs_nothing(tmp_path):
    root, ran = tmp_path / "checkpoints", tmp_path / "payload-ran"
    folder = save_checkpoint(root, 3, 0, {"logits": {}}, {"rng": rng_state()})
    assert load_checkpoint(folder, 0)[0] == 3
    payload = pickle.dumps(_Payload(ran))
    # where a pickle would be read by earlier versions, and where our tensors are
    (folder / "shared.pt").write_bytes(payload)
    with pytest.raises(CheckpointError, match="pickle format of earlier versions"):
        load_checkpoint(folder, 0)
    (folder / "shared.pt").unlink()
    (folder / "rank00000.safetensors").write_bytes(payload)
    with pytest.raises(CheckpointError, match=r"cannot read .*rank00000\.safetensors"):
        load_checkpoint(folder, 0)
    assert not ran.exists()


@pytest.mark.parametrize("dim", [0, 1])
def test_pieces_saved_at_two_ranks_read_at_any_split(tmp_path, dim):
    full = torch.arange(8 * 12, dtype=torch.float32).reshape(8, 12)
    for rank, chunk in enumerate(full.chunk(2, dim=dim)):
        write_pieces(pieces_file(tmp_path, rank), {"logits/w": (chunk, PieceSpec(dim, rank, 2))})
    reader = PieceReader(tmp_path)
    assert reader.global_shape("logits/w") == (8, 12) and torch.equal(reader.read_full("logits/w"), full)
    for parts in (1, 4):
        for rank, expected in enumerate(full.chunk(parts, dim=dim)):
            assert torch.equal(reader.read("logits/w", PieceSpec(dim, rank, parts)), expected)
    pieces_file(tmp_path, 1).unlink()
    with pytest.raises(CheckpointError, match=r"chunks \[0\] of 2.*incomplete"):
        PieceReader(tmp_path)
