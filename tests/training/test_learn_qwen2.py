"""`compressor learn` on a tiny Qwen2: the q/k/v biases reach the output model unchanged."""

import torch

from compressor.checkpoints.masks import load_masks
from compressor.models import load_model
from compressor.runs.learn import run_learn
from compressor.sparsity import NM, is_nm
from tests.training.test_learn import _cfg


def test_learned_qwen2_keeps_its_biases(tmp_path, tiny_qwen2_dir, text_file):
    cfg = _cfg(tiny_qwen2_dir, text_file, **{"train.steps": 2, "train.log_every": 1, "train.checkpoint_every": 2,
                                              "evaluation.enabled": False})
    run_learn(cfg, tmp_path / "run")
    dense = load_model(str(tiny_qwen2_dir)).model.state_dict()
    learned = load_model(str(tmp_path / "run" / "model")).model.state_dict()
    biases = [n for n in dense if n.endswith(".bias")]
    assert len(biases) == 6 and learned.keys() == dense.keys()
    for name in biases:
        assert torch.equal(learned[name], dense[name]), name
    masks = load_masks(tmp_path / "run" / "masks.safetensors")
    assert len(masks) == 14 and not any(n.endswith(".bias") for n in masks)
    for name, mask in masks.items():
        assert is_nm(mask, NM(2, 4)) and torch.equal(learned[name], dense[name] * mask), name
