"""The megatron-core GPTModel built from an HF LLaMA (or Qwen2, with q/k/v biases): same logits as HF, and its
real state dict round-trips."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from compressor.parallel.megatron_convert import LlamaDims, megatron_to_hf
from tests.parallel.megatron_workers import run_ranks, save_tiny_hf, state_dict_and_logits

pytest.importorskip("megatron.core")
pytestmark = pytest.mark.distributed


def hf_reference(folder: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


@pytest.mark.parametrize("model_type,tied,tp,pp", [("llama", False, 1, 1), ("llama", True, 1, 1),
                                                   ("llama", False, 2, 1), ("llama", True, 1, 2), ("qwen2", False, 2, 1)],
                         ids=["untied-tp1", "tied-tp1", "untied-tp2", "tied-pp2", "qwen2-tp2"])
def test_megatron_model_matches_hf(tmp_path, model_type, tied, tp, pp):
    folder = save_tiny_hf(tmp_path / "hf", tied, model_type=model_type)
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(1))
    run_ranks(state_dict_and_logits, tp * pp, str(folder), str(tmp_path), tp, pp, ids)
    result = torch.load(tmp_path / "result.pt", weights_only=False)

    hf = hf_reference(folder)
    dims = LlamaDims.from_hf_config(hf.config)
    back = megatron_to_hf(result["states"], dims, tp, pp)  # the live megatron modules' tensors, merged
    reference = {k: v for k, v in hf.state_dict().items() if not (tied and k == "lm_head.weight")}
    assert set(back) == set(reference)
    assert dims.qkv_bias == (model_type == "qwen2") == any(k.endswith("q_proj.bias") for k in reference)
    for name, value in reference.items():
        assert torch.equal(back[name], value), name
    if result["logits"] is not None:
        with torch.no_grad():
            expected = hf(input_ids=ids).logits
        assert result["logits"].shape == expected.shape
        torch.testing.assert_close(result["logits"], expected, rtol=0, atol=1e-5)
