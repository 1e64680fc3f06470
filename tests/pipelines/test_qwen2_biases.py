"""One-shot pruning of a Qwen2 (q/k/v biases): biases stay dense and unchanged, and the layer error the
pipeline reports is the error of the biased layer's outputs on the dense model's inputs."""

import pytest
import torch

from compressor.execution.base import InProcessExecutor
from compressor.methods.registry import SparseGPTOptions, WandaOptions
from compressor.models import load_model
from compressor.models.layers import prunable_linears
from compressor.pipelines.sequential import OneShotPlan, prune_sequential
from compressor.sparsity import NM, is_nm

WINDOWS = torch.randint(0, 49152, (6, 32), generator=torch.Generator().manual_seed(3))
QKV = ("q_proj", "k_proj", "v_proj")


def _biases(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith(".bias")}


def _dense_inputs(model, names) -> dict[str, torch.Tensor]:
    """The (tokens, in) inputs each named linear sees in the dense model."""
    inputs, handles = {}, []
    for name in names:
        def hook(m, args, name=name):
            inputs.setdefault(name, []).append(args[0].reshape(-1, args[0].shape[-1]).detach())
        handles.append(model.get_submodule(name).register_forward_pre_hook(hook))
    with torch.no_grad():
        model(WINDOWS)
    for h in handles:
        h.remove()
    return {n: torch.cat(x) for n, x in inputs.items()}


@pytest.mark.parametrize("method, options", [("wanda", WandaOptions()), ("sparsegpt", SparseGPTOptions())])
def test_biases_are_carried_through_and_errors_are_output_errors(tiny_qwen2_dir, method, options):
    dense = load_model(str(tiny_qwen2_dir)).model
    loaded = load_model(str(tiny_qwen2_dir))
    biases = _biases(dense)
    assert {n.rsplit(".", 2)[-2] for n in biases} == set(QKV)  # o_proj and the MLP have none
    assert all(b.abs().max() > 0 for b in biases.values())
    plan = OneShotPlan(method, NM(2, 4), options, SparseGPTOptions() if method == "sparsegpt" else None,
                       batch_size=6)
    outcome = prune_sequential(loaded.model, loaded.arch, WINDOWS, plan, InProcessExecutor())

    after = _biases(loaded.model)
    assert after.keys() == biases.keys()
    for name, value in biases.items():
        assert torch.equal(after[name], value), name
    targets = prunable_linears(loaded.model, loaded.arch)
    assert all(is_nm(loaded.model.get_submodule(t.name).weight, NM(2, 4)) for t in targets)
    assert not any(name.endswith(".bias") for name in outcome.masks)

    # The reported error of each biased linear: its output error on the dense inputs, over the output
    # without its bias (the bias is the same on both sides, so it cancels from the difference).
    qkv = [t.name for t in targets if t.layer_type in QKV]
    inputs = _dense_inputs(dense, qkv)
    reported = {r.name: r.error for r in outcome.layers}
    for name in qkv:
        x, d, p = inputs[name].double(), dense.get_submodule(name), loaded.model.get_submodule(name)
        with torch.no_grad():
            y_dense = torch.nn.functional.linear(x, d.weight.double(), d.bias.double())
            y_pruned = torch.nn.functional.linear(x, p.weight.double(), p.bias.double())
            measured = float((y_dense - y_pruned).pow(2).sum() / (y_dense - d.bias.double()).pow(2).sum())
        assert reported[name] == pytest.approx(measured, rel=1e-4), name


def test_sparsegpt_updates_lower_the_biased_output_error(tiny_qwen2_dir):
    # SparseGPT's weight update minimises ||(W - W') X||: with the bias kept it is the output error itself.
    errors = {}
    for update in (False, True):
        loaded = load_model(str(tiny_qwen2_dir))
        opts = SparseGPTOptions(update_weights=update)
        plan = OneShotPlan("sparsegpt", NM(2, 4), opts, opts, targets=(r".*\.0\.self_attn\.[qkv]_proj",))
        outcome = prune_sequential(loaded.model, loaded.arch, WINDOWS, plan, InProcessExecutor())
        errors[update] = {r.name: r.error for r in outcome.layers}
    assert len(errors[True]) == 3
    assert all(errors[True][n] < errors[False][n] for n in errors[True])
