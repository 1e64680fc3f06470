"""Block-by-block execution must reproduce the model's own forward pass exactly."""

import pytest
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


def _first_block(folder):
    """Block 0 of the model in ``folder``, the model's arch and the block's inputs (6 windows, batches of 4)."""
    loaded = load_model(str(folder))
    model, arch = loaded.model, loaded.arch
    return decoder_blocks(model, arch)[0], arch, capture_block_inputs(model, arch, _windows(), batch_size=4)


@torch.no_grad()
def test_statistics_without_outputs_stop_at_the_last_group_and_match(tiny_llama_dir):
    block, arch, inputs = _first_block(tiny_llama_dir)
    full, outs = collect_block_stats(block, inputs, arch.input_groups, "gram")
    ran: list[str] = []
    handles = [block.get_submodule(rel).register_forward_hook(lambda m, a, o, rel=rel: ran.append(rel))
               for rel in arch.linear_names]
    try:
        early, none = collect_block_stats(block, inputs, arch.input_groups, "gram", outputs=False)
        attn_only, _ = collect_block_stats(block, inputs, arch.input_groups[:2], "norms", outputs=False)
    finally:
        for h in handles:
            h.remove()
    assert none is None and outs is not None
    for g in arch.input_groups:
        torch.testing.assert_close(early[g.name].gram, full[g.name].gram, rtol=0, atol=0)
        assert early[g.name].tokens == full[g.name].tokens == 6 * 32
    torch.testing.assert_close(attn_only["attn_out"].norms_sq, torch.diagonal(full["attn_out"].gram), rtol=1e-6, atol=1e-6)
    # down_proj (after the last group's input) never ran; the attention-only pass stopped before the MLP
    assert "mlp.down_proj" not in ran and ran.count("mlp.gate_proj") == 2
    assert ran.count("self_attn.q_proj") == 4 and ran.count("self_attn.o_proj") == 2


@torch.no_grad()
def test_statistics_without_outputs_refuse_groups_out_of_execution_order(tiny_llama_dir):
    block, arch, inputs = _first_block(tiny_llama_dir)
    reordered = [arch.input_groups[2], arch.input_groups[0]]  # the MLP input runs after the attention input
    with pytest.raises(RuntimeError, match=r"\['mlp_in'\] were not reached.*execution order"):
        collect_block_stats(block, inputs, reordered, "norms", outputs=False)
