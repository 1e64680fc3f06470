"""NMMaskParametrization on single modules: priors, modes, errors, resume, transfer, bf16."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from compressor.errors import NonFiniteError, SparsityPatternError
from compressor.methods.magnitude import magnitude_mask
from compressor.methods.maskllm.gumbel import gumbel_softmax_probs, soft_mask
from compressor.methods.maskllm.mask import NMMaskParametrization
from compressor.sparsity import NM, assert_nm


def _agreement(mask: torch.Tensor, prior: torch.Tensor, m: int) -> float:
    return float((mask == prior).reshape(mask.shape[0], -1, m).all(-1).float().mean())


@pytest.mark.parametrize("nm", [NM(2, 4), NM(1, 4), NM(4, 8)], ids=str)
def test_prior_moves_the_initial_argmax_and_strength_zero_does_nothing(nm):
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(0))
    prior = magnitude_mask(w, nm)
    none = NMMaskParametrization(64, 128, nm, seed=1)
    before = none.logits.detach().clone()
    none.init_from_prior(prior, 0.0)
    assert torch.equal(none.logits, before)
    chance = 1 / len(none.patterns)
    assert _agreement(none.hard_mask(), prior, nm.m) < 2 * chance + 0.05
    strong = NMMaskParametrization(64, 128, nm, seed=1)
    strong.init_from_prior(prior, 3.0)
    assert _agreement(strong.hard_mask(), prior, nm.m) > 0.8
    huge = NMMaskParametrization(64, 128, nm, seed=1)
    huge.init_from_prior(prior, 20.0)
    assert torch.equal(huge.hard_mask(), prior)
    assert huge.max_prob() > strong.max_prob() > none.max_prob()


def test_prior_offset_is_strength_times_std_times_overlap():
    nm = NM(2, 4)
    m = NMMaskParametrization(2, 4, nm, seed=3)
    start = m.logits.detach().clone()
    prior = torch.tensor([[1, 1, 0, 0], [0, 0, 1, 1]], dtype=torch.bool)
    m.init_from_prior(prior, 2.0)
    std = float(start.std())
    got = m.logits.detach()
    for o in range(2):
        for c, pattern in enumerate(m.patterns.bool()):
            overlap = int((pattern & prior[o]).sum())
            assert float(got[o, 0, c]) == pytest.approx(float(start[o, 0, c]) + 2.0 * std * (overlap - 1), abs=1e-6)


def test_bad_priors_and_widths_name_the_layer():
    m = NMMaskParametrization(8, 16, NM(2, 4), name="model.layers.0.mlp.up_proj")
    with pytest.raises(SparsityPatternError, match=r"model\.layers\.0\.mlp\.up_proj: prior mask has shape \(8, 8\)"):
        m.init_from_prior(torch.ones(8, 8, dtype=torch.bool), 3.0)
    with pytest.raises(SparsityPatternError, match=r"up_proj: prior mask.*break the 2:4"):
        m.init_from_prior(torch.ones(8, 16, dtype=torch.bool), 3.0)
    with pytest.raises(SparsityPatternError, match=r"model\.layers\.1\.mlp\.down_proj.*not divisible by M=4"):
        NMMaskParametrization(4, 30, NM(2, 4), name="model.layers.1.mlp.down_proj")
    with pytest.raises(ValueError, match="keep-patterns"):
        NMMaskParametrization(4, 32, NM(8, 16))


def test_eval_mode_is_a_plain_linear_with_the_hard_mask_and_training_is_soft():
    torch.manual_seed(0)
    lin = nn.Linear(16, 8)
    w = lin.weight.detach().clone()
    mask = NMMaskParametrization(8, 16, NM(2, 4), seed=2)
    parametrize.register_parametrization(lin, "weight", mask)
    x = torch.randn(5, 16)
    assert mask.training  # registration copies the host's mode; model.eval() reaches the mask
    lin.eval()
    assert not mask.training
    with torch.no_grad():
        torch.testing.assert_close(lin(x), F.linear(x, w * mask.hard_mask(), lin.bias), rtol=0, atol=0)
    lin.train()
    mask.set_schedule(2.0, 100.0)
    state = mask.generator.get_state()
    soft = lin.weight
    expected = w * soft_mask(gumbel_softmax_probs(mask.logits, 2.0, 100.0, torch.Generator().set_state(state)),
                             mask.patterns)
    torch.testing.assert_close(soft, expected, rtol=1e-6, atol=1e-7)  # fused softmax: rounding only
    assert ((soft != 0) & (soft.abs() < w.abs() * 0.999)).any()  # some entries only partly kept
    with pytest.raises(ValueError, match="tau"):
        mask.set_schedule(0.0, 100.0)


def test_noise_off_gives_the_deterministic_soft_mask_and_leaves_the_generator_alone():
    lin = nn.Linear(16, 8, bias=False)
    w = lin.weight.detach().clone()
    mask = NMMaskParametrization(8, 16, NM(2, 4), seed=5, noise=False)
    parametrize.register_parametrization(lin, "weight", mask)
    lin.train()
    mask.set_schedule(2.0, 100.0)
    state = mask.generator.get_state()
    probs = torch.softmax(100.0 * mask.logits.detach() / 2.0, dim=-1)  # (out, G, C): no Gumbel noise
    first, second = lin.weight, lin.weight  # two reads, two forwards of the parametrization
    torch.testing.assert_close(first, w * soft_mask(probs, mask.patterns), rtol=1e-6, atol=1e-7)
    assert torch.equal(first, second) and torch.equal(mask.generator.get_state(), state)
    assert "noise off" in repr(mask)
    mask.set_noise(True)  # back on: a Gumbel sample from the untouched generator
    noisy = w * soft_mask(gumbel_softmax_probs(mask.logits, 2.0, 100.0, torch.Generator().set_state(state)),
                          mask.patterns)
    torch.testing.assert_close(lin.weight, noisy, rtol=1e-6, atol=1e-7)
    assert not torch.allclose(noisy, first)
    assert NMMaskParametrization(8, 16, NM(2, 4)).noise  # noise is the default


class ParallelLinearLike(nn.Module):
    """Shaped like megatron's Column/RowParallelLinear: forward reads self.weight, returns (out, bias)."""

    def __init__(self, i: int, o: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(o, i))
        self.bias = nn.Parameter(torch.randn(o))

    def forward(self, x):
        return torch.matmul(x, self.weight.t()), self.bias


def test_any_module_reading_self_weight_is_wrapped_without_changing_its_math():
    layer = ParallelLinearLike(8, 4)
    w = layer.weight.detach().clone()
    mask = NMMaskParametrization(4, 8, NM(1, 4), seed=0)
    parametrize.register_parametrization(layer, "weight", mask)
    layer.eval()
    x = torch.randn(3, 8)
    out, bias = layer(x)
    torch.testing.assert_close(out, x @ (w * mask.hard_mask()).t())
    assert bias is layer.bias


def _train(mask, lin, steps, opt, x):
    for _ in range(steps):
        opt.zero_grad()
        lin(x).pow(2).mean().backward()
        opt.step()


def test_resume_from_logits_optimizer_and_generator_state_is_bit_exact():
    torch.manual_seed(0)
    x = torch.randn(4, 16)

    def build():
        lin = nn.Linear(16, 8)
        with torch.no_grad():
            lin.weight.copy_(torch.arange(128.0).reshape(8, 16).sin())
            lin.bias.zero_()
        lin.requires_grad_(False)
        mask = NMMaskParametrization(8, 16, NM(2, 4), seed=11)
        parametrize.register_parametrization(lin, "weight", mask)
        mask.train()
        return lin, mask, torch.optim.AdamW([mask.logits], lr=1e-2)

    lin, mask, opt = build()
    _train(mask, lin, 3, opt, x)
    ckpt = copy.deepcopy((mask.logits.detach(), opt.state_dict(), mask.generator.get_state()))
    _train(mask, lin, 3, opt, x)  # the run that gets "killed" after the checkpoint
    lin2, mask2, opt2 = build()
    mask2.load_logits(ckpt[0])
    opt2.load_state_dict(ckpt[1])
    mask2.generator.set_state(ckpt[2])
    _train(mask2, lin2, 3, opt2, x)
    assert torch.equal(mask.logits, mask2.logits)
    assert not torch.equal(mask.logits, ckpt[0])


def test_load_logits_checks_shape_and_values():
    a = NMMaskParametrization(4, 8, NM(2, 4), seed=0, name="q_proj")
    b = NMMaskParametrization(4, 8, NM(2, 4), seed=1, name="q_proj", dtype=torch.bfloat16)
    b.load_logits(a.logits.detach())
    assert b.logits.dtype == torch.bfloat16 and torch.equal(b.hard_mask(), a.hard_mask())
    with pytest.raises(SparsityPatternError, match=r"q_proj: transferred has shape \(4, 2, 5\)"):
        b.load_logits(torch.zeros(4, 2, 5), what="transferred")
    with pytest.raises(NonFiniteError, match="q_proj"):
        b.load_logits(torch.full((4, 2, 6), float("nan")))


def test_bf16_logits_learn_and_give_valid_masks():
    lin = nn.Linear(32, 8).to(torch.bfloat16)
    lin.weight.requires_grad_(False)
    mask = NMMaskParametrization(8, 32, NM(2, 4), dtype=torch.bfloat16, seed=4)
    parametrize.register_parametrization(lin, "weight", mask)
    mask.train()
    lin(torch.randn(3, 32, dtype=torch.bfloat16)).float().pow(2).sum().backward()
    assert mask.logits.grad.dtype == torch.bfloat16 and mask.logits.grad.abs().sum() > 0
    assert lin.parametrizations.weight.original.grad is None
    assert_nm(mask.hard_mask(), NM(2, 4))
    mask.eval()
    assert_nm(lin.weight, NM(2, 4))


def test_moving_to_the_same_device_keeps_the_noise_stream():
    mask = NMMaskParametrization(4, 8, NM(2, 4), seed=0)
    gen = mask.generator
    mask.to("cpu")
    mask.float()
    assert mask.generator is gen


def test_a_meta_device_mask_has_its_shapes_and_no_storage():
    mask = NMMaskParametrization(8, 16, NM(2, 4), device="meta")  # what compressor.parallel.meta_proof builds
    assert mask.logits.is_meta and tuple(mask.logits.shape) == (8, 4, 6) and mask.patterns.is_meta
    masked = mask(torch.empty(8, 16, device="meta"))  # eval: the hard mask
    assert masked.is_meta and tuple(masked.shape) == (8, 16)
