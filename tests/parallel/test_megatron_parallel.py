"""TP=2, PP=2 and DP=2 megatron ranks learn exactly what one HF process learns: same initial logits, loss,
logits gradients (regulariser included) and hard masks.

The Gumbel noise is switched off on both sides (it is drawn per shard, so layouts differ in it by
design); the soft masks are then softmax(kappa * logits / tau) everywhere.
"""

from __future__ import annotations

import pytest
import torch

from compressor.methods.maskllm import MaskLLMConfig, attach_masks, mask_train, set_schedule_state
from compressor.methods.maskllm import sparse_weight_regularizer
from tests.parallel.megatron_workers import masked_step, run_ranks, save_tiny_hf

pytest.importorskip("megatron.core")

SEED, TAU, KAPPA, LAM = 3, 1.0, 100.0, 0.05
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
           "mlp.up_proj", "mlp.down_proj")


def reference(folder, windows: torch.Tensor, lam: float, monkeypatch) -> dict:
    """One HF process: attach_masks, noise-free soft-mask loss over all micro-batches, then hard masks."""
    from transformers import AutoModelForCausalLM

    from compressor.methods.maskllm import gumbel

    monkeypatch.setattr(gumbel, "sample_gumbel", lambda shape, generator=None, device=None: torch.zeros(shape))
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    names = [f"model.layers.{i}.{rel}" for i in range(model.config.num_hidden_layers) for rel in LINEARS]
    masks = attach_masks(model, names, MaskLLMConfig(sparsity="2:4"), seed=SEED)
    initial = {f"{n}.weight": m.logits.detach().clone() for n, m in masks.items()}
    set_schedule_state(masks, TAU, KAPPA)
    mask_train(masks, True)
    losses = []
    for window in windows:
        lm = model(input_ids=window, labels=window).loss
        ((lm - lam * sparse_weight_regularizer(masks)) / len(windows)).backward()
        losses.append(float(lm.detach()))
    grads = {f"{n}.weight": m.logits.grad.clone() for n, m in masks.items()}
    mask_train(masks, False)
    with torch.no_grad():
        hard_losses = [float(model(input_ids=w, labels=w).loss) for w in windows]
    hard = {f"{n}.weight": m.hard_mask() for n, m in masks.items()}
    return {"initial": initial, "soft_loss": sum(losses) / len(losses), "grads": grads,
            "hard_loss": sum(hard_losses) / len(hard_losses), "hard": hard}


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return save_tiny_hf(tmp_path_factory.mktemp("hf") / "tiny", tied=False)


@pytest.fixture(scope="module")
def windows():
    return torch.randint(0, 96, (2, 2, 16), generator=torch.Generator().manual_seed(5))  # (micro-batches, B, T)


def test_regulariser_changes_the_reference_gradient(tiny_folder, windows, monkeypatch):
    # Otherwise the equality below would not show that each stage's regulariser reaches its logits.
    with_reg = reference(tiny_folder, windows, LAM, monkeypatch)["grads"]
    without = reference(tiny_folder, windows, 0.0, monkeypatch)["grads"]
    for name in with_reg:
        assert (with_reg[name] - without[name]).abs().max() > 1e-3 * with_reg[name].abs().max(), name


@pytest.mark.distributed
@pytest.mark.parametrize("tp,pp,dp", [(2, 1, 1), (1, 2, 1), (1, 1, 2)], ids=["tp2", "pp2", "dp2"])
def test_parallel_layout_matches_single_process(tmp_path, tiny_folder, windows, monkeypatch, tp, pp, dp):
    n_mb = windows.shape[0] // dp  # DP replicas split the micro-batches; the global batch is the same
    run_ranks(masked_step, tp * pp * dp, str(tiny_folder), str(tmp_path), tp, pp, windows, n_mb, TAU, KAPPA, LAM, SEED)
    got = torch.load(tmp_path / "result.pt", weights_only=False)
    want = reference(tiny_folder, windows, LAM, monkeypatch)

    assert got["layout"] == (tp, pp, dp)
    assert set(got["initial"]) == set(want["initial"]) == set(got["grads"])
    for name, value in want["initial"].items():  # the single-process trainer's initial logits, bit for bit
        assert torch.equal(got["initial"][name], value), name
    assert got["soft_loss"] == pytest.approx(want["soft_loss"], rel=1e-6)
    for name, value in want["grads"].items():
        assert value.abs().max() > 0, name
        torch.testing.assert_close(got["grads"][name], value, rtol=1e-4, atol=1e-4 * float(value.abs().max()))
    assert got["hard_loss"] == pytest.approx(want["hard_loss"], rel=1e-6)
    for name, value in want["hard"].items():
        assert torch.equal(got["hard"][name], value), name
