"""TP=2, PP=2 and DP=2 megatron ranks (and a Qwen2, with q/k/v biases, at TP=2) learn exactly what one HF
process learns: same initial logits, loss, logits gradients (regulariser included) and hard masks, whether a
step holds one mask sample for all its micro-batches (``sample_every: step``) or samples per forward
(``micro_batch``).

The Gumbel noise is switched off on both sides for the comparison (it is drawn per shard, so layouts
differ in it by design); the soft masks are then softmax(kappa * logits / tau) everywhere. With the noise
on, the ranks' generators show how many samples a step drew.
"""

from __future__ import annotations

import pytest
import torch

from compressor.methods.maskllm import (
    MaskLLMConfig, attach_masks, hold_samples, mask_train, set_noise, set_schedule_state, step_surrogate,
)
from tests.parallel.megatron_workers import SAMPLE_MODES, bf16_step, masked_step, run_ranks, save_tiny_hf

pytest.importorskip("megatron.core")

SEED, TAU, KAPPA, LAM = 3, 1.0, 100.0, 0.05
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
           "mlp.up_proj", "mlp.down_proj")


def reference(folder, windows: torch.Tensor, lam: float) -> dict:
    """One HF process, as the single-process loop steps: one noise-free sample held for all micro-batches
    (mean loss), one backward of the step surrogate (regulariser included); then the hard masks."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    names = [f"model.layers.{i}.{rel}" for i in range(model.config.num_hidden_layers) for rel in LINEARS]
    masks = attach_masks(model, names, MaskLLMConfig(sparsity="2:4"), seed=SEED)
    initial = {f"{n}.weight": m.logits.detach().clone() for n, m in masks.items()}
    set_schedule_state(masks, TAU, KAPPA)
    mask_train(masks, True)
    set_noise(masks, False)
    hold_samples(model, masks)
    losses = []
    for window in windows:
        lm = model(input_ids=window, labels=window).loss
        (lm / len(windows)).backward()
        losses.append(float(lm.detach()))
    step_surrogate(masks, lam).backward()
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


@pytest.fixture(scope="module")
def want(tiny_folder, windows):
    return reference(tiny_folder, windows, LAM)


def test_regulariser_changes_the_reference_gradient(tiny_folder, windows, want):
    # Otherwise the equality below would not show that each stage's regulariser reaches its logits.
    without = reference(tiny_folder, windows, 0.0)["grads"]
    for name, with_reg in want["grads"].items():
        assert (with_reg - without[name]).abs().max() > 1e-3 * with_reg.abs().max(), name


@pytest.mark.distributed
@pytest.mark.parametrize("tp,pp,dp", [(2, 1, 1), (1, 2, 1), (1, 1, 2)], ids=["tp2", "pp2", "dp2"])
def test_parallel_layout_matches_single_process(tmp_path, tiny_folder, windows, want, tp, pp, dp):
    check_layout_matches(tmp_path, tiny_folder, windows, want, tp, pp, dp)


@pytest.mark.distributed
def test_qwen2_with_qkv_biases_at_tp2_matches_single_process(tmp_path, windows):
    folder = save_tiny_hf(tmp_path / "qwen2", tied=False, model_type="qwen2")
    check_layout_matches(tmp_path, folder, windows, reference(folder, windows, LAM), 2, 1, 1)


def check_layout_matches(tmp_path, folder, windows, want, tp, pp, dp):
    n_mb = windows.shape[0] // dp  # DP replicas split the micro-batches; the global batch is the same
    run_ranks(masked_step, tp * pp * dp, str(folder), str(tmp_path), tp, pp, windows, n_mb, TAU, KAPPA, LAM, SEED)
    got = torch.load(tmp_path / "result.pt", weights_only=False)

    assert got["layout"] == (tp, pp, dp)
    # Every mask of every rank drew one sample per step when holding, one per forward otherwise (the
    # ColumnParallelLinear's two reads of its weight see one sample either way).
    assert got["draws"] == {"micro_batch": [n_mb], "step": [1]}
    assert set(got["initial"]) == set(want["initial"])
    for name, value in want["initial"].items():  # the single-process trainer's initial logits, bit for bit
        assert torch.equal(got["initial"][name], value), name
    for mode in SAMPLE_MODES:
        assert set(got["grads"][mode]) == set(want["grads"]), mode
        assert got["soft_loss"][mode] == pytest.approx(want["soft_loss"], rel=1e-6), mode
        for name, value in want["grads"].items():
            assert value.abs().max() > 0, name
            torch.testing.assert_close(got["grads"][mode][name], value, rtol=1e-4,
                                       atol=1e-4 * float(value.abs().max()), msg=lambda m: f"{mode} {name}: {m}")
    assert got["hard_loss"] == pytest.approx(want["hard_loss"], rel=1e-6)
    for name, value in want["hard"].items():
        assert torch.equal(got["hard"][name], value), name


def test_bf16_weights_on_a_host_without_bf16_units_learn_like_torchs_bf16_kernels(tmp_path, tiny_folder, windows,
                                                                                   want):
    """megatron runs bf16 weights without autocast. On a CPU without bf16 units (simulated: the host's bf16
    path reported as "none") its products take the float32 emulation of the same bf16 numbers; the loss and
    logits gradients are those of torch's own bf16 kernels (the path "amx" selects) within bf16 rounding,
    and close to the float32 run's."""
    got = {}
    for hardware in ("none", "amx"):
        out = tmp_path / hardware
        out.mkdir()
        run_ranks(bf16_step, 2, str(tiny_folder), str(out), 2, windows, TAU, KAPPA, LAM, SEED, hardware)
        got[hardware] = torch.load(out / "result.pt", weights_only=False)
    emulated, native = got["none"], got["amx"]
    assert torch.bfloat16 in emulated["dtypes"] and torch.bfloat16 in native["dtypes"]
    assert emulated["rounded"] > 0 and native["rounded"] == 0  # the emulation ran only where it should
    assert emulated["loss"] == pytest.approx(native["loss"], rel=1e-2)
    assert emulated["loss"] == pytest.approx(want["soft_loss"], rel=2e-2)
    assert set(emulated["grads"]) == set(native["grads"]) == set(want["grads"])
    flat = {k: torch.cat([g[n].flatten() for n in sorted(want["grads"])])
            for k, g in (("emulated", emulated["grads"]), ("native", native["grads"]), ("float32", want["grads"]))}
    cosine = torch.nn.functional.cosine_similarity
    assert float(cosine(flat["emulated"], flat["native"], dim=0)) > 0.99
    assert float(cosine(flat["emulated"], flat["float32"].float(), dim=0)) > 0.98
