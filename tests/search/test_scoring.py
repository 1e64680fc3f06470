"""Fitness jobs: a candidate assembled from the database, scored against the dense model's hidden states."""

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from compressor.data import calibration_windows, load_token_ids
from compressor.execution.base import ExecutorConfig, InProcessExecutor, make_executor
from compressor.models.config import ModelConfig
from compressor.search.evolution import breed
from compressor.search.levels import LevelSet, SearchSpace
from compressor.search.repair import snap
from compressor.search.scoring import Scorer, ScoringSpec, all_tokens, assembler, final_hidden, score_windows
from compressor.sparsity.plan import layer_shapes
from tests.search.helpers import tiny_database

LEVELS = LevelSet.unstructured(0.5, 0.9, 0.1)


def _setup(tmp_path, tiny_llama_dir, text_file):
    loaded, targets, db, _ = tiny_database(tmp_path / "db", tiny_llama_dir, text_file, "sparsegpt", LEVELS)
    space = SearchSpace.build(layer_shapes(targets), LEVELS, 0.7)
    uniform = snap(space.level_positions([0.7] * len(space)), space)
    pool = [uniform] + breed([uniform], space, np.random.default_rng(0), 3)
    ids = calibration_windows(load_token_ids(str(text_file), loaded.tokenizer), 4, 32, 1)
    hidden = final_hidden(loaded.model, ids, 2)
    spec = ScoringSpec(ModelConfig(source=str(tiny_llama_dir)), db, space.names, "kl", batch_size=2)
    return spec, pool, ids, hidden


def test_a_candidate_scored_against_itself_has_zero_kl(tmp_path, tiny_llama_dir, text_file):
    spec, pool, ids, hidden = _setup(tmp_path, tiny_llama_dir, text_file)
    own = final_hidden(assembler(spec).apply(pool[1]), ids, 2)
    assert score_windows(spec, pool[1].tolist(), ids, own, all_tokens(4, 32)).value == 0.0
    assert score_windows(spec, pool[1].tolist(), ids, hidden, all_tokens(4, 32)).value > 0.0
    scorer = Scorer(InProcessExecutor(), spec, ids, hidden, windows_per_job=1)
    whole = Scorer(InProcessExecutor(), spec, ids, hidden, windows_per_job=4)
    a, b = scorer.score(pool, all_tokens(4, 32)), whole.score(pool, all_tokens(4, 32))
    assert np.allclose(a, b, rtol=1e-12) and len(set(a)) == len(pool)  # candidates differ, splits do not matter


@pytest.mark.ray
def test_ray_and_in_process_scoring_agree(tmp_path, tiny_llama_dir, text_file):
    spec, pool, ids, hidden = _setup(tmp_path, tiny_llama_dir, text_file)
    picks = all_tokens(4, 32)[:3] + [(3, 17)]  # a stage budget may end inside a window
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as a Ray task with task_cpus=1 runs
    try:
        local = Scorer(InProcessExecutor(), spec, ids, hidden, windows_per_job=2).score(pool, picks)
    finally:
        torch.set_num_threads(threads)
    with make_executor(ExecutorConfig(kind="ray", num_cpus=2, object_store_mb=500)) as executor:
        remote = Scorer(executor, spec, ids, hidden, windows_per_job=2).score(pool, picks)
        built = tiny_database(tmp_path / "ray-db", tiny_llama_dir, text_file, "sparsegpt", LEVELS, executor)[3]
    assert remote == local
    assert built.solved == 14 * len(LEVELS)  # the database built by Ray tasks holds the same entries
    for path in (tmp_path / "db").rglob("*.safetensors"):
        a, b = load_file(str(path)), load_file(str(tmp_path / "ray-db" / path.relative_to(tmp_path / "db")))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), path


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_assembled_weights_depend_only_on_the_levels(tmp_path, tiny_llama_dir, text_file, method):
    loaded, targets, db, _ = tiny_database(tmp_path / "db", tiny_llama_dir, text_file, method, LEVELS)
    space = SearchSpace.build(layer_shapes(targets), LEVELS, 0.7)
    first, other = breed([snap(space.level_positions([0.7] * len(space)), space)], space, np.random.default_rng(1), 2)
    a = assembler(ScoringSpec(ModelConfig(source=str(tiny_llama_dir)), db, space.names, "kl"))
    a.apply(first)
    a.apply(other)  # every layer that differs is overwritten, then restored below from the database
    model = a.apply(first)
    for name, k in zip(space.names, first):
        dense = loaded.model.get_submodule(name).weight.detach()
        assert torch.equal(model.get_submodule(name).weight, db.weight(name, int(k), dense)), name
    assert (len(a.dense) == len(space)) == (method == "wanda")  # dense copies only for mask-only entries


def test_perplexity_fitness_needs_no_dense_model(tmp_path, tiny_llama_dir, text_file):
    spec, pool, ids, _ = _setup(tmp_path, tiny_llama_dir, text_file)
    ppl = ScoringSpec(spec.model, spec.database, spec.names, "ppl", batch_size=2)
    values = Scorer(InProcessExecutor(), ppl, ids, None, windows_per_job=2).score(pool, all_tokens(4, 32))
    model = assembler(ppl).apply(pool[0])
    with torch.no_grad():
        logits = model(ids).logits[:, :-1].double()  # (4, 31, V): the whole model's own forward, for reference
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    assert values[0] == pytest.approx(float(nll.exp()), rel=1e-5) and len(set(values)) == len(pool)
