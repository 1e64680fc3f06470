"""The precision setting: bf16 and float32 paths agree within stated tolerances, the hardware is
detected and a machine without bf16 units still runs everything, and every report says which path ran."""

from __future__ import annotations

import json
from contextlib import nullcontext
import logging

import pytest
import torch

from compressor.calibration.stats import InputStats
from compressor.config.base import validate_config
from compressor.errors import ConfigError
from compressor.methods.maskllm import MaskLLMConfig, attach_masks, hold_samples, mask_train, set_noise, step_surrogate
from compressor.precision import EmulatedBF16Products, Precision, bf16_hardware, bf16_products, log_precision

BF16 = Precision(compute="bfloat16", statistics="bfloat16")


def test_config_is_typed_and_validated():
    assert Precision().compute == "float32" and Precision().statistics == "float64"
    with pytest.raises(Exception, match="compute"):
        Precision(compute="float16")
    from compressor.runs.prune import PruneConfig

    with pytest.raises(ConfigError, match="precision.statistics"):
        validate_config(PruneConfig, {"precision": {"statistics": "int8"}})


def test_bf16_gram_products_stay_close_to_float64(torch_seed=0):
    torch.manual_seed(torch_seed)
    x = torch.randn(4096, 96) * torch.linspace(0.1, 10, 96)  # columns of very different scale
    exact = (x.double().T @ x.double())
    for precision, tolerance in ((Precision(), 1e-6), (BF16, 1e-2)):
        stats = InputStats.empty("gram", 96, precision.statistics_dtype)
        for chunk in x.split(512):
            stats.add(chunk)
        error = float((stats.gram - exact).norm() / exact.norm())
        assert error < tolerance, (precision, error)
    # float64 inputs are never narrowed, whatever the setting
    stats = InputStats.empty("gram", 96, torch.bfloat16)
    stats.add(x.double())
    assert torch.allclose(stats.gram, exact, rtol=1e-12)


def test_float32_statistics_stay_float32_inside_the_bf16_compute_region():
    """Calibration hooks fire under the block's bf16 autocast: the float64 setting's products must
    still be float32 products of the (bf16) activations, not bf16 ones."""
    torch.manual_seed(0)
    x = (torch.randn(2048, 64) * torch.linspace(0.1, 10, 64)).bfloat16()
    exact = x.double().T @ x.double()
    errors = {}
    for precision in (Precision(compute="bfloat16"), BF16):
        stats = InputStats.empty("gram", 64, precision.statistics_dtype)
        with precision.autocast():
            stats.add(x)
        errors[precision.statistics] = float((stats.gram - exact).norm() / exact.norm())
    assert errors["float64"] < 1e-6 < 1e-4 < errors["bfloat16"], errors


def test_a_machine_without_bf16_units_runs_and_says_so(monkeypatch, caplog):
    import compressor.precision as precision

    precision.bf16_hardware.cache_clear()
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    try:
        assert bf16_hardware() == "none"
        with caplog.at_level(logging.INFO):
            log_precision(BF16, "prune")
        assert "no bf16 matrix hardware" in caplog.text
        assert isinstance(bf16_products(), EmulatedBF16Products)
        x, w = torch.randn(3, 8), torch.randn(4, 8)
        with BF16.autocast():  # a float32 GEMM of the bf16 operands, rounded to bf16
            y = torch.nn.functional.linear(x, w)
        assert y.dtype == torch.bfloat16
        assert torch.equal(y, (x.bfloat16().float() @ w.bfloat16().float().T).bfloat16())
    finally:
        precision.bf16_hardware.cache_clear()


F = torch.nn.functional
PRODUCTS = {  # name -> product of leaves made by leaf(*shape)
    "linear": lambda leaf: F.linear(leaf(2, 16, 48), leaf(24, 48), leaf(24)),
    "matmul": lambda leaf: torch.matmul(leaf(2, 16, 48), leaf(48, 24)),
    "@": lambda leaf: leaf(16, 48) @ leaf(48, 24),
    "bmm": lambda leaf: torch.bmm(leaf(2, 16, 48), leaf(2, 48, 24)),
    "addmm": lambda leaf: torch.addmm(leaf(24), leaf(16, 48), leaf(48, 24)),
    "baddbmm": lambda leaf: torch.baddbmm(leaf(2, 16, 24), leaf(2, 16, 48), leaf(2, 48, 24)),
    "einsum": lambda leaf: torch.einsum("bij,jk->bik", leaf(2, 16, 48), leaf(48, 24)),
    "sdpa": lambda leaf: F.scaled_dot_product_attention(leaf(2, 3, 16, 8), leaf(2, 3, 16, 8), leaf(2, 3, 16, 8),
                                                        is_causal=True),
}


@pytest.mark.parametrize("name", list(PRODUCTS))
@pytest.mark.parametrize("inputs", ["autocast", "bf16 tensors"])
def test_emulated_bf16_products_give_the_numbers_of_bf16_gemms(name, inputs):
    """Value and gradients of each product under EmulatedBF16Products equal torch's own bf16 kernel's up to
    float32 summation order, far below bf16's rounding step (2^-8 relative). Attention is the exception
    within that step: torch's bf16 kernel rounds its scores and probabilities to bf16 too, the emulation
    keeps them float32."""
    results = {}
    for emulated in (False, True):
        generator, leaves = torch.Generator().manual_seed(0), []

        def leaf(*shape):
            t = torch.randn(*shape, generator=generator)
            leaves.append((t if inputs == "autocast" else t.bfloat16()).requires_grad_())
            return leaves[-1]

        with EmulatedBF16Products() if emulated else nullcontext():
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=inputs == "autocast"):
                out = PRODUCTS[name](leaf)
            out.float().square().sum().backward()
        assert out.dtype == torch.bfloat16
        results[emulated] = out.detach().float(), [t.grad.float() for t in leaves]
    (ref, ref_grads), (got, got_grads) = results[False], results[True]
    tolerance = 2**-8 if name == "sdpa" else 1e-3
    assert float((got - ref).norm() / ref.norm()) < tolerance, name
    for a, b in zip(ref_grads, got_grads, strict=True):
        assert float((b - a).norm() / a.norm()) < 1e-2, name


def test_emulation_leaves_float32_and_float64_products_alone():
    x, w = torch.randn(16, 48), torch.randn(48, 24)
    with EmulatedBF16Products():
        assert torch.equal(x @ w, torch.mm(x, w)) and (x @ w).dtype == torch.float32
        assert (x.double() @ w.double()).dtype == torch.float64
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert (x.double() @ w.double()).dtype == torch.float64  # autocast does not touch float64 either


def test_a_tiny_llama_learns_alike_on_emulated_and_native_bf16_products(tiny_llama_dir):
    """A forward and backward of a whole model under bf16 autocast: the emulated path's loss and gradients
    are the bf16 kernel's within bf16 rounding."""
    from compressor.models import load_model

    ids = torch.randint(0, 1000, (2, 32), generator=torch.Generator().manual_seed(0))
    out = {}
    for emulated in (False, True):
        model = load_model(str(tiny_llama_dir)).model
        with EmulatedBF16Products() if emulated else nullcontext():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = model(input_ids=ids, labels=ids, use_cache=False).loss.float()
            loss.backward()
        out[emulated] = loss.item(), torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    assert out[True][0] == pytest.approx(out[False][0], rel=2e-3)
    a, b = out[False][1], out[True][1]
    assert float(F.cosine_similarity(a, b, dim=0)) > 0.999


@pytest.mark.parametrize("sample_every", ["step", "micro_batch"])
def test_maskllm_logit_gradients_agree_between_precisions(tiny_llama_dir, sample_every):
    """The logits' gradient under bf16 (frozen weights held in bf16, float32 samples) is the float32 one
    within bf16's rounding of the products."""
    from compressor.methods.maskllm.attach import store_frozen_weights
    from compressor.models import load_model

    ids = torch.randint(0, 1000, (2, 32), generator=torch.Generator().manual_seed(0))
    grads = {}
    for name, precision in (("fp32", Precision()), ("bf16", Precision(compute="bfloat16"))):
        model = load_model(str(tiny_llama_dir)).model
        names = [f"model.layers.{i}.mlp.up_proj" for i in range(2)]
        masks = attach_masks(model, names, MaskLLMConfig(sparsity="2:4", sample_every=sample_every), seed=3)
        set_noise(masks, False)
        mask_train(masks, True)
        if precision.compute == "bfloat16":
            store_frozen_weights(model, masks, torch.bfloat16)
            assert model.get_submodule(names[0]).parametrizations.weight.original.dtype == torch.bfloat16
        if sample_every == "step":
            held = hold_samples(model, masks, dtype=torch.float32)
            assert all(h.dtype == torch.float32 for h in held.values())
        with precision.autocast():
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss.float()
        loss.backward()
        if sample_every == "step":
            step_surrogate(masks, 0.0).backward()
        grads[name] = {n: m.logits.grad.clone() for n, m in masks.items()}
        assert all(m.logits.dtype == torch.float32 for m in masks.values())
    for n in grads["fp32"]:
        a, b = grads["fp32"][n], grads["bf16"][n]
        assert float((a - b).norm() / a.norm()) < 0.05, n
        assert float(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0)) > 0.99, n


def _prune_cfg(tmp_path, model, text, method, precision, name):
    import yaml

    cfg = {"model": {"source": str(model)}, "method": method, "executor": {"kind": "inprocess"},
           "calibration": {"data": {"source": str(text)}, "num_windows": 8, "seq_len": 64, "batch_size": 4},
           "evaluation": {"data": {"source": str(text)}, "seq_len": 64, "max_windows": 4},
           "precision": precision.model_dump()}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt", "sparseswaps"])
def test_prune_in_bf16_agrees_with_float32(tmp_path, tiny_llama_dir, text_file, method):
    from compressor.checkpoints.masks import load_masks
    from compressor.cli import main

    reports, masks = {}, {}
    for name, precision in (("fp32", Precision()), ("bf16", BF16)):
        out = tmp_path / name
        assert main(["prune", "--config", _prune_cfg(tmp_path, tiny_llama_dir, text_file, method, precision, name),
                     "--output", str(out)]) == 0
        reports[name] = json.loads((out / "report.json").read_text())
        masks[name] = load_masks(out / "masks.safetensors")
    assert reports["bf16"]["precision"]["compute"] == "bfloat16" and reports["fp32"]["precision"]["compute"] == "float32"
    a, b = reports["fp32"]["summary"], reports["bf16"]["summary"]
    assert b["mean_layer_error"] == pytest.approx(a["mean_layer_error"], rel=0.05)
    agree = sum(int((masks["fp32"][k] == masks["bf16"][k]).sum()) for k in masks["fp32"])
    total = sum(m.numel() for m in masks["fp32"].values())
    assert agree / total > (0.999 if method == "magnitude" else 0.9)  # near-ties may flip, nothing else
    assert reports["bf16"]["perplexity"]["perplexity"] == pytest.approx(reports["fp32"]["perplexity"]["perplexity"],
                                                                        rel=0.05)


def test_learn_in_bf16_ships_the_source_weights_times_the_mask(tmp_path, tiny_llama_dir, text_file):
    from compressor.checkpoints.masks import load_masks
    from compressor.models import load_model
    from compressor.runs.learn import run_learn
    from tests.training.test_learn import _cfg

    cfg = _cfg(tiny_llama_dir, text_file, **{"precision": {"compute": "bfloat16"}, "train.steps": 2,
                                             "train.eval_every": 2, "evaluation.max_windows": 2})
    report = run_learn(cfg, tmp_path / "run")
    assert report["precision"]["compute"] == "bfloat16" and report["history"]["evals"]
    dense = load_model(str(tiny_llama_dir)).model
    baked = load_model(str(tmp_path / "run" / "model")).model
    masks = load_masks(tmp_path / "run" / "masks.safetensors")
    for name, mask in masks.items():
        weight = baked.get_parameter(name)
        assert weight.dtype == torch.float32 and torch.equal(weight, dense.get_parameter(name) * mask), name
