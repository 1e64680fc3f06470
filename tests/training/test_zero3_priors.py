"""The priors of a partitioned (ZeRO-3) run, made a layer at a time, are the masks of the whole-model prior."""

import pytest
import torch

from compressor.checkpoints.masks import save_masks
from compressor.errors import ConfigError
from compressor.models import load_model
from compressor.models.layers import prunable_linears
from compressor.runs.learn import layer_priors, prior_masks
from tests.training.test_learn import _cfg


def _names(model_dir):
    loaded = load_model(str(model_dir))
    return loaded.model, [f"{t.name}.weight" for t in prunable_linears(loaded.model, loaded.arch, [".*"], [])]


def _by_layer(prior, model, names):
    if callable(prior):
        return {n: prior(n[: -len(".weight")], model.get_parameter(n).detach()) for n in names}
    return {n: prior[n] for n in names}


@pytest.mark.parametrize("kind", ["magnitude", "wanda"])  # solved per gathered layer / a lazy one-shot walk
def test_layer_priors_equal_the_whole_model_prior(tiny_llama_dir, text_file, kind):
    cfg = _cfg(tiny_llama_dir, text_file, prior={"kind": kind, "calibration": {"data": {"source": str(text_file)},
                                                                             "num_windows": 4, "seq_len": 32}})
    model, names = _names(tiny_llama_dir)
    whole = prior_masks(cfg, names)
    layered = _by_layer(layer_priors(cfg, names), model, names)
    assert whole.keys() == layered.keys()
    for name in names:
        assert torch.equal(whole[name].bool(), layered[name].bool()), name


def test_a_file_prior_is_read_a_mask_at_a_time(tmp_path, tiny_llama_dir, text_file):
    model, names = _names(tiny_llama_dir)
    masks = prior_masks(_cfg(tiny_llama_dir, text_file), names)
    save_masks(tmp_path / "masks.safetensors", masks, "2:4")
    prior = layer_priors(_cfg(tiny_llama_dir, text_file, prior={"kind": "file", "path": str(tmp_path)}), names)
    assert all(torch.equal(prior(n[: -len(".weight")], None), masks[n]) for n in names)
    save_masks(tmp_path / "masks.safetensors", {n: masks[n] for n in names[1:]}, "2:4")
    with pytest.raises(ConfigError, match="no mask for 1 layers"):
        layer_priors(_cfg(tiny_llama_dir, text_file, prior={"kind": "file", "path": str(tmp_path)}), names)
