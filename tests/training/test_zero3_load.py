"""ZeRO-3 without whole-model loads (deepspeed.zero3_partitioned_load) on 2 gloo ranks: while the model is
built and filled, no parameter but the one being loaded is ever whole on a rank; the run learns what the
whole-model ZeRO-3 path learns, and rank 0's files (written a layer at a time) hold what that path writes."""

import json
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from compressor.checkpoints.logits import load_logits
from compressor.checkpoints.masks import load_masks
from compressor.errors import ConfigError
from compressor.utils.run_folder import open_run_folder
from tests.training.test_learn import _cfg

pytestmark = pytest.mark.distributed

BASE = {"train.grad_accum": 1, "train.steps": 4, "train.checkpoint_every": 2, "train.eval_every": 2,
        "train.micro_batch_size": 1, "evaluation.max_windows": 2, "maskllm.sample_every": "micro_batch"}


def _zero3(model, text, port, partitioned=True, **over):
    return _cfg(model, text, **{**BASE, **over}, backend="deepspeed",
                deepspeed={"zero_stage": 3, "world_size": 2, "master_port": port, "zero3_persistence_threshold": 0,
                           "zero3_partitioned_load": partitioned})


def _rank(rank: int, world: int, cfg, out: str) -> None:
    """A spawned rank that records, during construction and load, which parameters are whole."""
    import deepspeed.runtime.zero.partition_parameters as pp

    import compressor.runs.learn as learn
    import compressor.training.zero3 as zero3

    seen, record = [], {"construction_whole": 0, "steps": [], "loaded": []}
    real_post_init = pp.Init._post_init_method

    def post_init(self, module):  # after each module is built: none of the parameters made so far is whole
        real_post_init(self, module)
        seen.extend(module.parameters(recurse=False))
        record["construction_whole"] = max(record["construction_whole"], sum(p.numel() > 0 for p in seen))

    real_fill, real_load = zero3.fill_partitioned, zero3.load_parameter
    model_ref = {}

    def fill(model, *args, **kwargs):
        model_ref["model"] = model
        return real_fill(model, *args, **kwargs)

    def load(param, key, store, backend):
        real_gathered = backend.gathered

        @contextmanager
        def probing(params, write=False):
            with real_gathered(params, write):
                whole = [n for n, p in model_ref["model"].named_parameters() if p.numel() > 0]
                record["steps"].append({"key": key, "whole": whole, "numel": int(param.numel()),
                                        "ds_numel": int(param.ds_numel)})
                yield

        backend.gathered = probing
        try:
            real_load(param, key, store, backend)
        finally:
            del backend.gathered
        record["loaded"].append([key, int(param.numel()), int(param.ds_tensor.numel()), int(param.ds_numel)])

    pp.Init._post_init_method = post_init
    zero3.fill_partitioned, zero3.load_parameter = fill, load
    learn._worker(rank, world, cfg, out)
    (Path(out) / f"load_rank{rank}.json").write_text(json.dumps(record))


def _spawn(cfg, out: Path, instrument: bool = True) -> Path:
    open_run_folder(out, "learn")
    if instrument:
        mp.spawn(_rank, args=(2, cfg, str(out)), nprocs=2, join=True)
    else:
        import compressor.runs.learn as learn

        mp.spawn(learn._worker, args=(2, cfg, str(out)), nprocs=2, join=True)
    return out


@pytest.fixture(scope="module")
def partitioned(tmp_path_factory, tiny_llama_dir, text):
    return _spawn(_zero3(tiny_llama_dir, text, 29581), tmp_path_factory.mktemp("z3") / "partitioned")


def test_no_rank_holds_more_than_the_parameter_it_loads(partitioned):
    for rank in range(2):
        record = json.loads((partitioned / f"load_rank{rank}.json").read_text())
        assert record["construction_whole"] == 0  # every module partitioned as soon as it was built
        assert len(record["steps"]) == 2 * 9 + 3  # 2 blocks x (7 linears + 2 norms); embedding, final norm, head
        for step in record["steps"]:  # inside each gather: only the parameter being loaded is whole
            assert step["whole"] == [step["key"]] and step["numel"] == step["ds_numel"], step
        for key, local, partition, total in record["loaded"]:  # and afterwards it is this rank's half again
            assert local == 0 and partition == (total + 1) // 2, key


def test_partitioned_load_learns_and_writes_what_the_whole_model_path_does(tmp_path, partitioned, tiny_llama_dir,
                                                                          text):
    legacy = _spawn(_zero3(tiny_llama_dir, text, 29583, partitioned=False), tmp_path / "legacy", instrument=False)
    new, old = (json.loads((d / "report.json").read_text()) for d in (partitioned, legacy))
    for key in ("pattern_ok", "density", "mask_change_vs_start", "prior_agreement", "memory_per_masked_weight"):
        assert new[key] == old[key], key
    assert new["history"]["evals"] == old["history"]["evals"]
    strip = lambda rows: [{k: v for k, v in r.items() if "second" not in k} for r in rows]  # noqa: E731
    assert strip(new["history"]["logs"]) == strip(old["history"]["logs"])
    assert new["perplexity"] == old["perplexity"]

    a, b = load_logits(partitioned / "logits.safetensors"), load_logits(legacy / "logits.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    a, b = load_masks(partitioned / "masks.safetensors"), load_masks(legacy / "masks.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    a, b = (load_file(str(d / "model" / "model.safetensors")) for d in (partitioned, legacy))
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    for name in ("config.json", "generation_config.json", "tokenizer.json"):
        assert json.loads((partitioned / "model" / name).read_text()) == json.loads((legacy / "model" / name).read_text())


def test_resume_after_kill_reproduces_the_uninterrupted_run(tmp_path, partitioned, tiny_llama_dir, text):
    from tests.training.test_deepspeed import _kill_and_resume

    out = tmp_path / "killed"
    # no evaluation (it draws no noise and reads no data, so the run is the same): two runs in under a minute
    _kill_and_resume(_zero3(tiny_llama_dir, text, 29585, **{"evaluation.enabled": False}), out)
    step = out / "checkpoints" / "step_0000002"
    assert (step / "logits.safetensors").is_file()  # streamed a layer at a time; nothing gathered in shared
    assert "logits" not in json.loads((step / "shared.json").read_text())
    resumed, whole = load_logits(out / "logits.safetensors"), load_logits(partitioned / "logits.safetensors")
    assert all(torch.equal(resumed[n], whole[n]) for n in whole)
    mine = json.loads((out / "report.json").read_text())["history"]
    theirs = json.loads((partitioned / "report.json").read_text())["history"]
    key = lambda r: (r["step"], r["loss"], r["max_prob"], r["flip_rate"])  # noqa: E731 (timings differ)
    assert [key(r) for r in mine["logs"]] == [key(r) for r in theirs["logs"]]


def test_tied_embeddings_load_partitioned_and_ship_one_head(tmp_path, text, smollm_dir):
    from compressor.models import load_model
    from tests.factories import make_tiny_model

    tied = make_tiny_model(tmp_path / "tied", tie_word_embeddings=True)
    out = _spawn(_zero3(tied, text, 29587, **{"train.steps": 2, "evaluation.enabled": False}), tmp_path / "run",
                 instrument=False)
    stored = load_file(str(out / "model" / "model.safetensors"))
    assert "lm_head.weight" not in stored  # as save_pretrained writes a tied model
    model = load_model(str(out / "model")).model
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    dense = load_model(str(tied)).model
    assert torch.equal(model.model.embed_tokens.weight, dense.model.embed_tokens.weight)
    masks = load_masks(out / "masks.safetensors")
    for name, mask in masks.items():
        assert torch.equal(model.get_parameter(name), dense.get_parameter(name) * mask)


def test_what_the_partitioned_load_cannot_do_yet_is_refused_with_the_way_out(tiny_llama_dir, text):
    with pytest.raises(ConfigError, match="zero3_partitioned_load: false"):
        _zero3(tiny_llama_dir, text, 29589, precision={"compute": "bfloat16"})
    with pytest.raises(ConfigError, match="zero3_partitioned_load: false"):
        _zero3(tiny_llama_dir, text, 29589, distill={"weight": 0.5})
    _zero3(tiny_llama_dir, text, 29589, partitioned=False, precision={"compute": "bfloat16"})


def test_transfer_logits_are_loaded_a_layer_at_a_time(tmp_path, partitioned, tiny_llama_dir, text):
    cfg = _zero3(tiny_llama_dir, text, 29591, init_logits=str(partitioned / "logits.safetensors"),
                 **{"train.steps": 2})
    report = json.loads((_spawn(cfg, tmp_path / "transfer", instrument=False) / "report.json").read_text())
    # its step-0 hard mask is the argmax of the logits it started from: the first run's final model
    first = json.loads((partitioned / "report.json").read_text())
    assert report["history"]["evals"][0]["perplexity"] == first["perplexity"]["perplexity"]


def test_a_file_prior_is_read_a_mask_at_a_time(tmp_path, partitioned, tiny_llama_dir, text):
    cfg = _zero3(tiny_llama_dir, text, 29593, prior={"kind": "file", "path": str(partitioned)},
                 maskllm={"sparsity": "2:4", "logits_lr": 0.05, "prior_strength": 50.0, "sample_every": "micro_batch"},
                 **{"train.steps": 1, "evaluation.enabled": False})
    report = json.loads((_spawn(cfg, tmp_path / "file-prior", instrument=False) / "report.json").read_text())
    assert report["prior_agreement"] == 1.0  # a strong prior: the step-0 masks are the file's masks
    from compressor.checkpoints.tree import load_tree
    from compressor.sparsity import unpack_bits

    prior = load_masks(partitioned / "masks.safetensors")
    kept = load_tree(tmp_path / "file-prior" / "checkpoints" / "step_0000001" / "shared")["start_masks"]
    assert kept.keys() == prior.keys()
    assert all(torch.equal(unpack_bits(kept[n], prior[n].shape[-1]), prior[n]) for n in prior)


def test_qwen2_biases_load_partitioned(tmp_path, tiny_qwen2_dir, text):
    from compressor.models import load_model

    out = _spawn(_zero3(tiny_qwen2_dir, text, 29595, **{"train.steps": 1, "evaluation.enabled": False}),
                 tmp_path / "qwen2", instrument=False)
    dense, baked = load_model(str(tiny_qwen2_dir)).model, load_model(str(out / "model")).model
    masks = load_masks(out / "masks.safetensors")
    for name, p in baked.named_parameters():
        expected = dense.get_parameter(name) * masks[name] if name in masks else dense.get_parameter(name)
        assert torch.equal(p, expected), name
    assert any(n.endswith("q_proj.bias") for n, _ in baked.named_parameters())
