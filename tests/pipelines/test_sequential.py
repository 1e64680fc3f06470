"""The sequential pipeline against a plain re-implementation with whole-model forward passes."""

import pytest
import torch

from compressor.execution.base import ExecutorConfig, InProcessExecutor, make_executor
from compressor.methods.objective import reconstruction_error
from compressor.methods.registry import MagnitudeOptions, SparseGPTOptions, SparseSwapsOptions, WandaOptions
from compressor.methods.wanda import wanda_mask
from compressor.models import load_model
from compressor.models.layers import prunable_linears
from compressor.pipelines.block_store import BlockStore
from compressor.pipelines.sequential import OneShotPlan, plan_slices, prune_sequential, row_runs
from compressor.sparsity import NM, is_nm

WINDOWS = torch.randint(0, 49152, (6, 32), generator=torch.Generator().manual_seed(3))


def _grams(model, targets, windows):
    """Gram matrix of each target's input, from one forward pass of the whole model."""
    grams, handles = {}, []
    for t in targets:
        def hook(m, args, name=t.name):
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            grams[name] = grams.get(name, 0) + x.T @ x
        handles.append(model.get_submodule(t.name).register_forward_pre_hook(hook))
    with torch.no_grad():
        for start in range(0, len(windows), 4):
            model(windows[start : start + 4])
    for h in handles:
        h.remove()
    return grams


def test_wanda_is_sequential_and_errors_use_dense_inputs(tiny_llama_dir):
    dense = load_model(str(tiny_llama_dir)).model
    loaded = load_model(str(tiny_llama_dir))
    plan = OneShotPlan("wanda", NM(2, 4), WandaOptions(), batch_size=4)
    outcome = prune_sequential(loaded.model, loaded.arch, WINDOWS, plan, InProcessExecutor())

    # Reference: prune block by block, each time measuring inputs with the partly pruned full model.
    reference = load_model(str(tiny_llama_dir)).model
    targets = prunable_linears(reference, loaded.arch)
    for block in (0, 1):
        block_targets = [t for t in targets if t.block == block]
        grams = _grams(reference, block_targets, WINDOWS)
        for t in block_targets:
            w = reference.get_submodule(t.name).weight
            w.data *= wanda_mask(w, torch.diagonal(grams[t.name]), NM(2, 4))
    for t in targets:
        got = loaded.model.get_submodule(t.name).weight
        torch.testing.assert_close(got, reference.get_submodule(t.name).weight)
        assert is_nm(got, NM(2, 4))
        assert torch.equal(outcome.masks[f"{t.name}.weight"], got != 0)

    dense_grams = _grams(dense, targets, WINDOWS)
    by_name = {r.name: r for r in outcome.layers}
    for t in targets:
        w = dense.get_submodule(t.name).weight
        expected = reconstruction_error(w, loaded.model.get_submodule(t.name).weight, dense_grams[t.name])
        assert by_name[t.name].error == pytest.approx(expected, rel=1e-4)
        assert 0 < by_name[t.name].error < 1
    assert set(outcome.timer.as_dict()) >= {"calibrate", "solve", "error"}


def test_targets_and_ignore_select_layers(tiny_llama_dir):
    loaded = load_model(str(tiny_llama_dir))
    plan = OneShotPlan("magnitude", NM(2, 4), MagnitudeOptions(), targets=(r".*mlp\..*",),
                       ignore=(r"model\.layers\.1\..*",), layer_error=False)
    outcome = prune_sequential(loaded.model, loaded.arch, WINDOWS[:0], plan, InProcessExecutor())
    assert sorted(outcome.masks) == [f"model.layers.0.mlp.{n}_proj.weight" for n in ("down", "gate", "up")]
    assert loaded.model.model.layers[1].mlp.up_proj.weight.count_nonzero() == 128 * 64


class _Crash(RuntimeError):
    pass


@pytest.mark.parametrize("method, options", [("wanda", WandaOptions()), ("sparsegpt", SparseGPTOptions())])
def test_resume_after_a_crash_gives_the_identical_result(tiny_llama_dir, tmp_path, method, options):
    plan = OneShotPlan(method, NM(2, 4), options, batch_size=4)  # sparsegpt: new weights in the block files
    whole = load_model(str(tiny_llama_dir))
    prune_sequential(whole.model, whole.arch, WINDOWS, plan, InProcessExecutor())

    def crash_after_block_0(k):
        if k == 0:
            raise _Crash

    first = load_model(str(tiny_llama_dir))
    with pytest.raises(_Crash):
        prune_sequential(first.model, first.arch, WINDOWS, plan, InProcessExecutor(), BlockStore(tmp_path),
                         on_block_done=crash_after_block_0)
    assert BlockStore(tmp_path).has(0) and not BlockStore(tmp_path).has(1)

    resumed = load_model(str(tiny_llama_dir))
    outcome = prune_sequential(resumed.model, resumed.arch, WINDOWS, plan, InProcessExecutor(), BlockStore(tmp_path))
    assert outcome.resumed_blocks == 1
    for name, p in whole.model.named_parameters():
        assert torch.equal(p, resumed.model.get_parameter(name)), name


@pytest.mark.ray
def test_ray_and_in_process_executors_give_identical_masks(tiny_llama_dir):
    plan = OneShotPlan("sparseswaps", NM(2, 4), SparseSwapsOptions(warm_start="sparsegpt"), SparseGPTOptions(),
                       batch_size=4, layer_error=False)
    local = load_model(str(tiny_llama_dir))
    a = prune_sequential(local.model, local.arch, WINDOWS, plan, InProcessExecutor())
    remote = load_model(str(tiny_llama_dir))
    with make_executor(ExecutorConfig(kind="ray", num_cpus=2, object_store_mb=500)) as ray_exec:
        b = prune_sequential(remote.model, remote.arch, WINDOWS, plan, ray_exec)
    assert a.masks.keys() == b.masks.keys()
    for name in a.masks:
        assert torch.equal(a.masks[name], b.masks[name]), name
    for name, p in local.model.named_parameters():
        assert torch.equal(p, remote.model.get_parameter(name)), name


SMOLLM2_GROUPS = {"attn_in": (960, 576, True), "attn_out": (576, 576, True), "mlp_in": (3072, 576, True),
                  "mlp_out": (576, 1536, True)}  # rows of the group's layers, input width, shared factor


def test_slices_are_cut_only_where_they_shorten_the_block():
    assert plan_slices(SMOLLM2_GROUPS, workers=1) == dict.fromkeys(SMOLLM2_GROUPS, 1)
    # Two workers: down_proj's chain (the 1536-wide factor, then its sweep) is within 6% of half the
    # block; a second slice would pay the sweep's per-column cost again for less than that.
    assert plan_slices(SMOLLM2_GROUPS, workers=2) == dict.fromkeys(SMOLLM2_GROUPS, 1)
    four = plan_slices(SMOLLM2_GROUPS, workers=4)
    assert four["mlp_out"] > 1 and four["attn_in"] == four["attn_out"] == 1
    assert plan_slices({"a": (3, 64, False), "b": (1, 64, False)}, workers=64)["a"] <= 3  # never more slices than rows


def test_row_runs_cut_stacked_layers_into_equal_runs():
    assert row_runs([4, 2], 1) == [[(0, 0, 4), (1, 0, 2)]]
    assert row_runs([4, 2], 2) == [[(0, 0, 3)], [(0, 3, 4), (1, 0, 2)]]
    assert row_runs([1, 1, 1], 3) == [[(0, 0, 1)], [(1, 0, 1)], [(2, 0, 1)]]


class _Recording(InProcessExecutor):
    """In-process jobs, but planned as for ``workers`` parallel workers; records each job's weight rows."""

    def __init__(self, workers: int) -> None:
        self.workers, self.rows = workers, []

    @property
    def parallelism(self) -> int:
        return self.workers

    def submit(self, fn, *args, **kwargs):
        if fn.__name__ == "solve_layers":
            self.rows += [(job.name, w.shape[0]) for job, w in zip(args[0], args[1])]
        return super().submit(fn, *args, **kwargs)


@pytest.mark.parametrize("method, options", [("sparsegpt", SparseGPTOptions()),
                                             ("sparseswaps", SparseSwapsOptions(warm_start="sparsegpt"))])
def test_row_slices_for_parallel_workers_give_the_same_model(tiny_llama_dir, method, options):
    plan = OneShotPlan(method, NM(2, 4), options, SparseGPTOptions(), batch_size=4, layer_error=False)
    runs = {}
    for workers in (1, 4):
        loaded = load_model(str(tiny_llama_dir))
        executor = _Recording(workers)
        runs[workers] = (prune_sequential(loaded.model, loaded.arch, WINDOWS, plan, executor), loaded.model, executor)
    (one, model_one, ex_one), (four, model_four, ex_four) = runs[1], runs[4]
    assert len(ex_four.rows) > len(ex_one.rows) == len(one.masks)  # some layers really were split
    for name in one.masks:
        assert torch.equal(one.masks[name], four.masks[name]), name
    for name, p in model_one.named_parameters():
        torch.testing.assert_close(p, model_four.get_parameter(name), rtol=1e-5, atol=1e-6)
