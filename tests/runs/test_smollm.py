"""The real SmolLM2-135M: load from the embedded GGUF, calibrate on WikiText-2, prune 2:4, evaluate."""

import pytest
import torch

from compressor.execution.base import InProcessExecutor
from compressor.methods.registry import SparseGPTOptions, WandaOptions
from compressor.models import load_model
from compressor.data import calibration_windows, eval_windows, load_token_ids
from compressor.eval import perplexity
from compressor.pipelines.sequential import OneShotPlan, prune_sequential
from compressor.sparsity import NM, is_nm

pytestmark = pytest.mark.smollm


@pytest.fixture(scope="module")
def data(smollm_dir, wikitext_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm_dir)
    calib = calibration_windows(load_token_ids(wikitext_dir / "wiki.valid.tokens", tok), 8, 256, seed=0)
    evaluation = eval_windows(load_token_ids(wikitext_dir / "wiki.test.raw", tok), 256, limit=6)
    return calib, evaluation


@pytest.fixture(scope="module")
def dense_ppl(smollm_dir, data):
    model = load_model(str(smollm_dir)).model
    return perplexity(model, data[1]).perplexity


def _prune_three_blocks(smollm_dir, calib, method, options):
    loaded = load_model(str(smollm_dir))
    assert loaded.arch.family == "llama" and len(loaded.model.model.layers) == 30
    plan = OneShotPlan(method, NM(2, 4), options, batch_size=4, targets=(r"model\.layers\.(0|1|2)\..*",))
    outcome = prune_sequential(loaded.model, loaded.arch, calib, plan, InProcessExecutor())
    assert len(outcome.masks) == 21
    for name, mask in outcome.masks.items():
        assert is_nm(loaded.model.get_parameter(name), NM(2, 4)) and mask.float().mean() == 0.5
    errors = [r.error for r in outcome.layers]
    assert all(0 < e < 0.5 for e in errors)
    return loaded.model, sum(errors) / len(errors)


def test_wanda_and_sparsegpt_2_4_on_smollm(smollm_dir, data, dense_ppl):
    errors = {}
    for method, options in (("wanda", WandaOptions()), ("sparsegpt", SparseGPTOptions())):
        model, errors[method] = _prune_three_blocks(smollm_dir, data[0], method, options)
        ppl = perplexity(model, data[1]).perplexity
        assert dense_ppl < ppl < 3 * dense_ppl, method  # three pruned blocks cost some, not everything
    assert errors["sparsegpt"] < errors["wanda"]


def test_dense_perplexity_is_sane(dense_ppl):
    assert 5 < dense_ppl < 60
