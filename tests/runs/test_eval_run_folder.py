"""`compressor eval RUN`: a run folder is evaluated as the sparse model it stands for, also when its
``model/`` is the dense base model with the masks beside it (as `compressor launch` writes it)."""

import json
import shutil

import pytest
import torch

from compressor.checkpoints.masks import save_masks
from compressor.cli import main
from compressor.sparsity import NM
from compressor.sparsity.nm import nm_mask_from_scores


def _eval(source, out, text_file):
    assert main(["eval", "--model", str(source), "--output", str(out),
                 "--set", f"evaluation.data.source={text_file}", "--set", "evaluation.seq_len=32",
                 "--set", "evaluation.max_windows=3"]) == 0
    return json.loads(out.read_text())


def _masks(model_dir):
    from safetensors.torch import load_file

    weights = load_file(str(next(model_dir.glob("*.safetensors"))))
    return {n: nm_mask_from_scores(w.abs(), NM(2, 4)) for n, w in weights.items()
            if n.endswith("proj.weight")}


def test_a_run_with_a_dense_model_folder_is_evaluated_masked(tmp_path, tiny_llama_dir, text_file):
    run = tmp_path / "run"
    shutil.copytree(tiny_llama_dir, run / "model")
    dense = _eval(run, tmp_path / "dense.json", text_file)
    assert "masks" not in dense
    masks = _masks(run / "model")
    save_masks(run / "masks.safetensors", masks, "2:4")
    sparse = _eval(run, tmp_path / "sparse.json", text_file)
    assert sparse["masks"]["applied"] == len(masks) > 0
    assert sparse["perplexity"]["perplexity"] != pytest.approx(dense["perplexity"]["perplexity"], rel=1e-3)


def test_masks_that_fit_no_weight_are_an_error(tmp_path, tiny_llama_dir, text_file, caplog):
    run = tmp_path / "run"
    shutil.copytree(tiny_llama_dir, run / "model")
    save_masks(run / "masks.safetensors", {"model.layers.0.mlp.nope.weight": torch.ones(4, 8, dtype=torch.bool)})
    assert main(["eval", "--model", str(run), "--set", f"evaluation.data.source={text_file}",
                 "--set", "evaluation.seq_len=32", "--set", "evaluation.max_windows=1"]) != 0
    assert "mask model.layers.0.mlp.nope.weight (4, 8) fits no weight" in caplog.text
