"""Jobs split the way the pipeline splits them give the whole layer's result."""

import pytest
import torch

from compressor.calibration.stats import InputStats
from compressor.methods.registry import (
    LayerJob,
    SparseGPTOptions,
    SparseSwapsOptions,
    WandaOptions,
    has_shared_factor,
    merge_row_chunks,
    row_separable,
    shared_factor,
    solve_layer,
    solve_layers,
    stackable,
)
from compressor.methods.sparsegpt import hessian_factor, sparsegpt
from compressor.sparsity import NM, Unstructured
from tests.methods.test_sparsegpt import correlated_problem, one_thread  # noqa: F401 (autouse fixture)


JOBS = {
    "sparsegpt": LayerJob("w", "sparsegpt", NM(2, 4), SparseGPTOptions(block_size=8)),
    "sparsegpt-mask": LayerJob("w", "sparsegpt", NM(2, 4), SparseGPTOptions(update_weights=False)),
    "swaps-from-sparsegpt": LayerJob("w", "sparseswaps", NM(2, 4), SparseSwapsOptions(warm_start="sparsegpt", refit=True),
                                     SparseGPTOptions(damp=0.05)),
    "swaps-from-wanda": LayerJob("w", "sparseswaps", NM(1, 4), SparseSwapsOptions(warm_start="wanda")),
}


@pytest.mark.parametrize("kind", sorted(JOBS))
def test_row_slices_with_a_shared_factor_give_the_whole_layers_result(kind):
    job = JOBS[kind]
    w, gram = correlated_problem(rows=11, cols=32, seed=4)
    stats = InputStats("gram", 32, 400, col_sq=torch.diagonal(gram).clone(), gram=gram)
    whole = solve_layer(job, w, stats)
    factor = shared_factor(job, stats)
    assert (factor is not None) == has_shared_factor(job) == (kind != "swaps-from-wanda")
    parts = [solve_layer(job, w[r0:r1], stats, factor) for r0, r1 in ((0, 3), (3, 4), (4, 11))]
    merged = merge_row_chunks(parts)
    assert row_separable(job)
    assert torch.equal(merged.mask, whole.mask)
    if whole.weight is None:
        assert merged.weight is None
    else:
        torch.testing.assert_close(merged.weight, whole.weight, rtol=1e-5, atol=1e-6)
    if whole.warm_start_mask is not None:
        assert torch.equal(merged.warm_start_mask, whole.warm_start_mask)
    assert merged.extra.keys() == whole.extra.keys()
    for key in whole.extra:
        assert merged.extra[key] == pytest.approx(whole.extra[key], rel=1e-9), key


def test_unstructured_and_per_layer_methods_are_not_split():
    assert not row_separable(LayerJob("w", "sparsegpt", Unstructured(0.5), SparseGPTOptions()))
    assert not row_separable(LayerJob("w", "magnitude", Unstructured(0.5), None))
    assert not has_shared_factor(LayerJob("w", "wanda", NM(2, 4), WandaOptions()))


def test_a_factor_made_for_other_options_is_refused():
    w, gram = correlated_problem(rows=4, cols=16)
    with pytest.raises(ValueError, match="damp=0.05 for width 16, not damp=0.01"):
        sparsegpt(w, gram, NM(2, 4), damp=0.01, factor=hessian_factor(gram, 0.05))


@pytest.mark.parametrize("kind", sorted(JOBS) + ["wanda", "magnitude"])
def test_jobs_never_write_into_their_shared_inputs(kind):
    """The Ray executor hands every job the statistics and the factor without a copy (shared memory),
    so a method that modified them in place would corrupt every other job reading them."""
    job = JOBS.get(kind) or LayerJob("w", kind, NM(2, 4), WandaOptions() if kind == "wanda" else None)
    w, gram = correlated_problem(rows=8, cols=32, seed=2)
    gram[5, :] = gram[:, 5] = 0  # a dead input: the paths that patch the Hessian's diagonal
    stats = InputStats("gram", 32, 400, col_sq=torch.diagonal(gram).clone(), gram=gram)
    factor = shared_factor(job, stats)
    before = [t.clone() for t in (gram, stats.col_sq, *([factor.upper, factor.dead] if factor else []))]
    solve_layer(job, w, stats, factor)
    solve_layer(job, w[:3], stats, None)
    after = [gram, stats.col_sq, *([factor.upper, factor.dead] if factor else [])]
    assert all(torch.equal(a, b) for a, b in zip(before, after))


@pytest.mark.parametrize("kind", sorted(JOBS))
def test_layers_on_the_same_inputs_solved_together_match_each_solved_alone(kind):
    template = JOBS[kind]
    jobs = [LayerJob(name, template.method, template.sparsity, template.options, template.sparsegpt) for name in "qkv"]
    w, gram = correlated_problem(rows=13, cols=32, seed=5)
    weights = [w[:6], w[6:8], w[8:]]
    stats = InputStats("gram", 32, 400, col_sq=torch.diagonal(gram).clone(), gram=gram)
    together = solve_layers(jobs, weights, stats)
    assert stackable(jobs) == (template.method != "sparseswaps")  # its report counts swaps per layer
    for job, weight, result in zip(jobs, weights, together):
        alone = solve_layer(job, weight, stats)
        assert result.name == job.name and torch.equal(result.mask, alone.mask)
        assert result.extra == pytest.approx(alone.extra)
        if alone.weight is not None:
            torch.testing.assert_close(result.weight, alone.weight, rtol=1e-5, atol=1e-6)


# --- the registry ------------------------------------------------------------------------------------
from compressor.errors import ConfigError  # noqa: E402
from compressor.methods.registry import METHODS, OneShotMethod, get_method, register  # noqa: E402
from compressor.methods.objective import reconstruction_error  # noqa: E402


def _stats(kind, gram):
    return InputStats(kind, gram.shape[0], 400, col_sq=torch.diagonal(gram).clone(), gram=gram)


@pytest.mark.parametrize("name", sorted(METHODS))
@pytest.mark.parametrize("level", [NM(2, 4), NM(3, 8), Unstructured(0.6)])
def test_every_registered_method_solves_a_real_layer(name, level):
    method = METHODS[name]
    w, gram = correlated_problem(rows=12, cols=32, seed=7)
    job = LayerJob("w", name, level, method.options())
    result = solve_layer(job, w, _stats(method.stats, gram))
    assert result.mask.shape == w.shape and result.mask.dtype == torch.bool
    if isinstance(level, NM):
        groups = result.mask.reshape(12, -1, level.m).sum(-1)
        assert bool((groups == level.n).all())  # exactly N kept in every group
    else:
        assert abs(float((~result.mask).float().mean()) - 0.6) < 0.05
    pruned = (result.weight if result.weight is not None else w) * result.mask
    assert 0 < reconstruction_error(w, pruned, gram) < 1
    assert method.cost(12, 32) > 0


def test_an_unknown_method_names_the_registered_ones():
    with pytest.raises(ConfigError, match=r"unknown one-shot method 'obs'; registered methods: .*magnitude.*sparsegpt"):
        get_method("obs")
    with pytest.raises(ConfigError, match="registered methods"):
        solve_layer(LayerJob("w", "obs", NM(2, 4), None), torch.ones(2, 4), InputStats("none", 4))
    from compressor.runs.prune import PruneConfig
    from compressor.config.base import validate_config

    with pytest.raises(ConfigError, match=r"`method`: .*unknown one-shot method 'obs'.*wanda"):
        validate_config(PruneConfig, {"method": "obs"})


@pytest.fixture
def toy_method():
    """A method registered by a test, removed afterwards: keep the smallest weights (reversed magnitude)."""

    class KeepSmallest(OneShotMethod):
        name = "keep_smallest"
        stats = "none"

        def solve(self, job, weight, stats, factor=None):
            from compressor.methods.registry import LayerResult
            from compressor.sparsity import mask_from_scores

            return LayerResult(job.name, mask_from_scores(-weight.abs(), job.sparsity), None, 0.0)

    register(KeepSmallest)
    yield KeepSmallest
    del METHODS["keep_smallest"]


def test_a_registered_toy_method_runs_without_edits_elsewhere(toy_method, tiny_llama_dir):
    w = torch.tensor([[4.0, -1.0, 3.0, 0.5], [0.1, 0.2, -5.0, 6.0]])
    result = solve_layer(LayerJob("w", "keep_smallest", NM(2, 4), None), w, InputStats("none", 4))
    assert result.mask.tolist() == [[False, True, False, True], [True, True, False, False]]

    # through the config and the whole pipeline
    from compressor.config.base import validate_config
    from compressor.execution.base import InProcessExecutor
    from compressor.models import load_model
    from compressor.pipelines.sequential import OneShotPlan, prune_sequential
    from compressor.runs.prune import PruneConfig
    from compressor.sparsity import mask_from_scores

    cfg = validate_config(PruneConfig, {"method": "keep_smallest"})
    assert cfg.method_options == toy_method.options()
    loaded = load_model(str(tiny_llama_dir))
    plan = OneShotPlan(cfg.method, NM(2, 4), cfg.method_options, layer_error=False)
    dense = {n: p.detach().clone() for n, p in loaded.model.named_parameters()}
    outcome = prune_sequential(loaded.model, loaded.arch, torch.empty(0, 8, dtype=torch.long), plan, InProcessExecutor())
    assert len(outcome.masks) == 14
    for name, mask in outcome.masks.items():
        assert torch.equal(mask, mask_from_scores(-dense[name].abs(), NM(2, 4)))


def test_layers_at_different_levels_are_not_stacked():
    same = [LayerJob(n, "wanda", NM(2, 4), WandaOptions()) for n in "qkv"]
    assert stackable(same)
    mixed = [LayerJob("q", "wanda", NM(2, 4), WandaOptions()), LayerJob("k", "wanda", NM(4, 8), WandaOptions())]
    assert not stackable(mixed)
    w, gram = correlated_problem(rows=10, cols=32, seed=1)
    stats = _stats("norms", gram)
    together = solve_layers(mixed, [w[:4], w[4:]], stats)
    assert torch.equal(together[0].mask, solve_layer(mixed[0], w[:4], stats).mask)
    assert torch.equal(together[1].mask, solve_layer(mixed[1], w[4:], stats).mask)
    assert together[1].mask.reshape(6, -1, 8).sum(-1).eq(4).all()
