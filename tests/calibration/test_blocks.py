"""Block-by-block execution must reproduce the model's own forward pass exactly."""

import torch

from compressor.calibration import capture_block_inputs, collect_block_stats, run_block
from compressor.models import load_model
from compressor.models.layers import decoder_blocks


def _windows(n=6, t=32, vocab=49152):
    return torch.randint(0, vocab, (n, t), generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def test_blockwise_forward_equals_model_forward(tiny_llama_dir):
    loaded = load_model(str(tiny_llama_dir))
    model, arch = loaded.model, loaded.arch
    windows = _windows()
    inputs = capture_block_inputs(model, arch, windows, batch_size=4)
    assert [h.shape for h in inputs.hidden] == [(4, 32, 64), (2, 32, 64)]
    for block in decoder_blocks(model, arch):
        inputs = run_block(block, inputs)
    hidden = torch.cat(inputs.hidden)
    logits = model.lm_head(model.model.norm(hidden))
    torch.testing.assert_close(logits, model(windows).logits, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_group_statistics_are_the_inputs_each_linear_sees(tiny_llama_dir):
    loaded = load_model(str(tiny_llama_dir))
    model, arch = loaded.model, loaded.arch
    block = decoder_blocks(model, arch)[1]
    seen: dict[str, list[torch.Tensor]] = {}
    handles = [
        block.get_submodule(rel).register_forward_pre_hook(lambda m, a, rel=rel: seen.setdefault(rel, []).append(a[0]))
        for rel in arch.linear_names
    ]
    windows = _windows()
    model(windows)
    for h in handles:
        h.remove()

    inputs = capture_block_inputs(model, arch, windows, batch_size=4)
    inputs = run_block(decoder_blocks(model, arch)[0], inputs)
    stats, _ = collect_block_stats(block, inputs, arch.input_groups, "gram")
    for group in arch.input_groups:
        for rel in group.linears:  # every linear of a group reads the same tensor
            x = torch.cat([s.reshape(-1, s.shape[-1]) for s in seen[rel]]).double()
            torch.testing.assert_close(stats[group.name].gram, x.T @ x, rtol=1e-5, atol=1e-4)
    assert stats["mlp_out"].width == 128
