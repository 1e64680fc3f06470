import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from compressor.models.arch import get_arch
from compressor.models.layers import prunable_linears
from compressor.search.fisher import FisherTraces, default_block_of, fisher_traces


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    names = [t.name for t in prunable_linears(model, get_arch(model.config))]
    return model, names


def _windows(n: int, length: int, vocab: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, length), generator=g)


def _loss(model, row):
    """Mean next-token cross-entropy of one sequence, in the logits' dtype (transformers' own loss
    would cast float64 logits down to float32)."""
    logits = model(input_ids=row[None]).logits[0, :-1]  # (T-1, V)
    return torch.nn.functional.cross_entropy(logits, row[1:])


def _brute_force(model, names, windows):
    """One sequence at a time, the plain model and autograd's .grad: sum_n ||grad_n||^2 per layer."""
    sums = {n: 0.0 for n in names}
    for row in windows:
        model.zero_grad(set_to_none=True)
        _loss(model, row).backward()
        for n in names:
            sums[n] += float(model.get_submodule(n).weight.grad.double().pow(2).sum())
    model.zero_grad(set_to_none=True)
    return sums


def test_exact_against_per_sequence_brute_force_in_float64(tiny):
    model, names = tiny
    model = model.double()
    try:
        windows = _windows(5, 12, model.config.vocab_size)
        got = fisher_traces(model, names, windows, batch_size=2)  # batches of 2, 2, 1
        want = _brute_force(model, names, windows)
        assert got.sequences == 5 and len(names) == 14
        for n in names:
            assert got.sq_grad_sums[n] == pytest.approx(want[n], rel=1e-10), n
    finally:
        model.float()


def test_batch_size_does_not_change_the_result_and_weights_stay_trainable(tiny):
    model, names = tiny
    windows = _windows(4, 16, model.config.vocab_size, seed=1)
    one = fisher_traces(model, names, windows, batch_size=1)
    four = fisher_traces(model, names, [windows[:3], windows[3]], batch_size=4)  # an iterable of pieces
    for n in names:
        assert four.sq_grad_sums[n] == pytest.approx(one.sq_grad_sums[n], rel=1e-5)
    assert all(p.requires_grad for p in model.parameters()) and all(p.grad is None for p in model.parameters())


def test_traces_are_per_weight_means_and_not_the_squared_mean_gradient(tiny):
    model, names = tiny
    windows = _windows(4, 16, model.config.vocab_size, seed=2)
    result = fisher_traces(model, names, windows)
    traces = result.layer_traces()
    name = names[0]
    assert traces[name] == pytest.approx(result.sq_grad_sums[name] / (4 * model.get_submodule(name).weight.numel()))
    # the squared norm of the mean gradient is smaller (Jensen), strictly for differing sequences
    model.zero_grad(set_to_none=True)
    sum(_loss(model, row) for row in windows).div(4).backward()
    mean_grad_sq = float(model.get_submodule(name).weight.grad.double().pow(2).sum())
    model.zero_grad(set_to_none=True)
    assert mean_grad_sq < 0.9 * result.sq_grad_sums[name] / 4


def test_block_traces_pool_a_blocks_layers_and_merge_adds_streams(tiny):
    model, names = tiny
    windows = _windows(4, 16, model.config.vocab_size, seed=3)
    whole = fisher_traces(model, names, windows)
    halves = fisher_traces(model, names, windows[:2]).merge(fisher_traces(model, names, windows[2:]))
    assert halves.sequences == 4
    for n in names:
        assert halves.sq_grad_sums[n] == pytest.approx(whole.sq_grad_sums[n], rel=1e-5)
    blocks = whole.block_traces()
    assert set(blocks) == {"model.layers.0", "model.layers.1"}
    in_block0 = [n for n in names if n.startswith("model.layers.0.")]
    expected = sum(whole.sq_grad_sums[n] for n in in_block0) / (4 * sum(whole.numel[n] for n in in_block0))
    assert blocks["model.layers.0"] == pytest.approx(expected)


def test_real_text_windows_and_errors(tiny, tiny_llama_dir, text_file):
    model, names = tiny
    from compressor.data.tokens import calibration_windows

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    ids = torch.tensor(tok(text_file.read_text()[:5000], add_special_tokens=False)["input_ids"])
    result = fisher_traces(model, names[:2], calibration_windows(ids, num_windows=2, length=32))
    assert result.sequences == 2 and all(v > 0 for v in result.layer_traces().values())
    with pytest.raises(TypeError, match="not an nn.Linear"):
        fisher_traces(model, ["model.layers.0.mlp"], ids[None, :8])
    with pytest.raises(ValueError, match="no calibration sequences"):
        FisherTraces({"a": 0.0}, {"a": 1}).layer_traces()
    assert default_block_of("model.layers.12.self_attn.q_proj") == "model.layers.12"
