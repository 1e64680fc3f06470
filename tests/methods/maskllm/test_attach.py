"""attach_masks & co. on a tiny LLaMA: gradients, modes, regulariser, statistics, baking back."""

import pytest
import torch
from torch import nn

from compressor.errors import SparsityPatternError
from compressor.methods.magnitude import magnitude_mask
from compressor.methods.maskllm import (
    MaskLLMConfig, attach_masks, hold_samples, layer_seed, mask_memory_bytes, mask_stats, mask_train, prior_agreement,
    release_samples, remove_masks, set_noise, set_schedule_state, sparse_weight_regularizer, step_surrogate,
)
from compressor.methods.maskllm.gumbel import gumbel_softmax_probs, soft_mask
from compressor.sparsity import NM, assert_nm

LINEARS = [f"model.layers.{i}.{p}" for i in range(2) for p in
           ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
            "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]


def _tiny_llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=256)
    return LlamaForCausalLM(cfg)


IDS = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_one_backward_reaches_every_logit_and_no_weight(dtype):
    model = _tiny_llama()
    masks = attach_masks(model, LINEARS, MaskLLMConfig(logits_dtype=dtype))
    assert list(masks) == LINEARS and all(m.logits.dtype == getattr(torch, dtype) for m in masks.values())
    mask_train(masks, True)
    set_schedule_state(masks, 2.0, 100.0)
    loss = model(input_ids=IDS, labels=IDS).loss - 1e-3 * sparse_weight_regularizer(masks)
    loss.backward()
    for m in masks.values():
        assert m.logits.grad is not None and m.logits.grad.abs().sum() > 0
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.parametrizations.weight.0.logits" for n in LINEARS}
    assert all(p.grad is None for n, p in model.named_parameters() if n not in trainable)


@pytest.mark.parametrize("train_weights", [False, True])
def test_a_held_sample_gives_the_gradient_of_one_sample_shared_by_all_micro_batches(train_weights):
    lam, batches = 1e-2, [IDS[:1], IDS[1:]]
    cfg = MaskLLMConfig(train_weights=train_weights)

    def grads(model, masks):
        params = [m.logits for m in masks.values()]
        if train_weights:
            params += [model.get_submodule(n).parametrizations.weight.original for n in masks]
        return [p.grad.clone() for p in params]

    # reference: the same sample with its graph in every micro-batch, one backward of the mean loss
    model = _tiny_llama()
    masks = attach_masks(model, LINEARS, cfg)
    mask_train(masks, True)
    set_schedule_state(masks, 2.0, 100.0)
    from torch.nn.utils import parametrize

    with parametrize.cached():  # one forward of each parametrization, reused by both micro-batches
        losses = [model(input_ids=b, labels=b).loss for b in batches]
        (sum(losses) / 2 - lam * sparse_weight_regularizer(masks)).backward()
    expected = grads(model, masks)

    model = _tiny_llama()
    masks = attach_masks(model, LINEARS, cfg)
    mask_train(masks, True)
    set_schedule_state(masks, 2.0, 100.0)
    hold_samples(model, masks)
    for b in batches:
        (model(input_ids=b, labels=b).loss / 2).backward()
    assert all(m.logits.grad is None for m in masks.values())  # nothing reaches the logits yet
    step_surrogate(masks, lam).backward()
    assert all(m.held is None for m in masks.values())
    got = grads(model, masks)
    assert len(got) == len(expected) and all(e.abs().sum() > 0 for e in expected)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-6)


def test_hold_samples_takes_the_weights_by_mask_name_and_noise_off_is_deterministic():
    # Megatron names masks globally, not by module path: it hands hold_samples the unmasked weights.
    model = _tiny_llama()
    masks = attach_masks(model, LINEARS[:3], MaskLLMConfig())
    mask_train(masks, True)
    set_noise(masks, False)
    weights = {n: model.get_submodule(n).parametrizations.weight.original for n in masks}
    by_name = hold_samples(weights, masks)
    assert all(model.get_submodule(n).weight is m.held for n, m in masks.items())  # every read serves the sample
    release_samples(masks)
    assert all(m.held is None for m in masks.values())
    by_model = hold_samples(model, masks)  # noise off: the same sample again, and the same as a plain forward
    release_samples(masks)
    for n in masks:
        assert torch.equal(by_name[n], by_model[n]) and torch.equal(by_model[n], model.get_submodule(n).weight)
    with pytest.raises(ValueError, match=f"no weight given for mask '{LINEARS[1]}'"):
        hold_samples({LINEARS[0]: weights[LINEARS[0]]}, masks)


def test_train_weights_lets_the_masked_weights_learn():
    model = _tiny_llama()
    masks = attach_masks(model, LINEARS[:2], MaskLLMConfig(train_weights=True))
    mask_train(masks, True)
    model(input_ids=IDS, labels=IDS).loss.backward()
    for n in LINEARS[:2]:
        assert model.get_submodule(n).parametrizations.weight.original.grad.abs().sum() > 0
    assert model.model.embed_tokens.weight.grad is None and model.get_submodule(LINEARS[2]).weight.grad is None


def test_regularizer_is_the_energy_of_the_sampled_masked_weights():
    model = _tiny_llama()
    dense = {n: model.get_submodule(n).weight.detach().clone() for n in LINEARS}
    masks = attach_masks(model, LINEARS, MaskLLMConfig())
    with pytest.raises(RuntimeError, match="no soft-mask forward"):
        sparse_weight_regularizer(model)
    mask_train(masks, True)
    set_schedule_state(masks, 1.5, 200.0)
    states = {n: m.generator.get_state() for n, m in masks.items()}
    model(input_ids=IDS)
    got_model, got_masks = (float(sparse_weight_regularizer(src).detach()) for src in (model, masks))
    want = 0.0
    for n, m in masks.items():
        probs = gumbel_softmax_probs(m.logits.detach(), 1.5, 200.0, torch.Generator().set_state(states[n]))
        want += float((dense[n] * soft_mask(probs, m.patterns)).pow(2).sum())
    assert got_model == pytest.approx(want, rel=1e-5) and got_masks == got_model
    assert want < sum(float(w.pow(2).sum()) for w in dense.values())
    mask_train(masks, False)
    assert all(m.last_masked is None for m in masks.values())


def test_priors_seed_the_masks_and_bad_layers_are_named():
    model = _tiny_llama()
    priors = {f"{n}.weight": magnitude_mask(model.get_submodule(n).weight.detach(), NM(2, 4)) for n in LINEARS}
    masks = attach_masks(model, LINEARS, MaskLLMConfig(prior_strength=20.0), priors)
    for n, m in masks.items():
        assert torch.equal(m.hard_mask(), priors[f"{n}.weight"])
    assert prior_agreement(masks, priors) == 1.0
    # strength 3 with random logits: most groups, not all, start on the prior's pattern (chance is 1/6)
    weak = attach_masks(_tiny_llama(), LINEARS, MaskLLMConfig(prior_strength=3.0), priors)
    assert 0.8 < prior_agreement(weak, priors) < 0.99
    assert prior_agreement(attach_masks(_tiny_llama(), LINEARS, MaskLLMConfig(prior_strength=0.0), priors), priors) < 0.3
    assert masks[LINEARS[0]].seed == layer_seed(0, LINEARS[0]) != masks[LINEARS[1]].seed
    fresh = _tiny_llama()
    with pytest.raises(ValueError, match="no prior mask for layer model.layers.0.mlp.up_proj"):
        attach_masks(fresh, ["model.layers.0.mlp.up_proj"], MaskLLMConfig(), {"other.weight": priors[f"{LINEARS[0]}.weight"]})
    with pytest.raises(ValueError, match="no module 'model.layers.0.mlp.nope'"):
        attach_masks(fresh, ["model.layers.0.mlp.nope"], MaskLLMConfig())
    with pytest.raises(ValueError, match="already parametrized"):
        attach_masks(model, LINEARS[:1], MaskLLMConfig())
    odd = nn.ModuleDict({"proj": nn.Linear(30, 4), "ok": nn.Linear(32, 4)})
    with pytest.raises(SparsityPatternError, match="proj.*input width 30 is not divisible by M=4"):
        attach_masks(odd, ["ok", "proj"], MaskLLMConfig())
    assert odd["ok"].weight.requires_grad and type(odd["ok"]) is nn.Linear  # nothing changed on failure


def test_stats_report_max_prob_and_exact_flip_rate():
    model = _tiny_llama()
    masks = attach_masks(model, LINEARS[:2], MaskLLMConfig())
    prev = {n: m.argmax_patterns() for n, m in masks.items()}
    stats = mask_stats(masks, prev)
    assert stats["flip_rate"] == 0 and 1 / 6 < stats["max_prob"] < 1
    assert stats["groups"] == sum(p.numel() for p in prev.values())
    m = masks[LINEARS[0]]
    with torch.no_grad():
        for row in range(3):  # force a different argmax in 3 groups
            m.logits[row, 0, (prev[LINEARS[0]][row, 0] + 1) % 6] = 10.0
    assert mask_stats(masks, prev)["flip_rate"] == pytest.approx(3 / stats["groups"])
    assert "flip_rate" not in mask_stats(masks)


def test_memory_per_masked_weight():
    model = _tiny_llama()
    fp32 = mask_memory_bytes(attach_masks(model, LINEARS[:2], MaskLLMConfig()))
    assert (fp32["logits"], fp32["optimizer_state"], fp32["total"]) == (6.0, 12.0, 24.0)  # 6 logits per 4 weights
    bf16 = mask_memory_bytes(attach_masks(_tiny_llama(), LINEARS[:2], MaskLLMConfig(logits_dtype="bfloat16")))
    assert (bf16["logits"], bf16["total"]) == (3.0, 12.0)
    wide = mask_memory_bytes(attach_masks(_tiny_llama(), LINEARS[:2], MaskLLMConfig(sparsity="4:8")), "sgd")
    assert (wide["logits"], wide["total"]) == (70 / 8 * 4, 70 / 8 * 8)
    assert fp32["masked_weights"] == 64 * 64 + 32 * 64


def test_eval_matches_hard_masks_and_baking_gives_plain_linears():
    model = _tiny_llama()
    dense = {n: model.get_submodule(n).weight.detach().clone() for n in LINEARS}
    masks = attach_masks(model, LINEARS, MaskLLMConfig())
    with torch.no_grad():
        mask_train(masks, True)
        soft_out = model(input_ids=IDS).logits
        mask_train(masks, False)
        masked_out = model(input_ids=IDS).logits
    hard = {n: m.hard_mask() for n, m in masks.items()}
    reference = _tiny_llama()  # the same dense model with W * hard_mask written in directly
    with torch.no_grad():
        for n in LINEARS:
            reference.get_submodule(n).weight.mul_(hard[n])
        torch.testing.assert_close(masked_out, reference(input_ids=IDS).logits, rtol=0, atol=0)
    assert not torch.allclose(soft_out, masked_out)
    removed = remove_masks(model, bake=True)
    assert set(removed) == set(LINEARS)
    for n in LINEARS:
        linear = model.get_submodule(n)
        assert type(linear) is nn.Linear and not hasattr(linear, "parametrizations")
        assert torch.equal(linear.weight, dense[n] * hard[n]) and torch.equal(removed[n], hard[n])
        assert_nm(linear.weight, NM(2, 4))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=IDS).logits, masked_out, rtol=0, atol=0)


def test_remove_without_baking_restores_the_dense_weights():
    model = _tiny_llama()
    dense = {n: model.get_submodule(n).weight.detach().clone() for n in LINEARS}
    masks = attach_masks(model, LINEARS, MaskLLMConfig())
    mask_train(masks, True)
    remove_masks(model, bake=False)
    for n in LINEARS:
        assert type(model.get_submodule(n)) is nn.Linear and torch.equal(model.get_submodule(n).weight, dense[n])
    assert remove_masks(model) == {}


def test_held_samples_and_their_gradients_do_not_depend_on_threading():
    # hold_samples and step_surrogate work layer by layer on threads; each layer draws from its own
    # generator, so one thread or two give the same samples and the same logits gradients bit for bit.
    def run(threads: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        def with_threads(fn):
            saved = torch.get_num_threads()
            torch.set_num_threads(threads)
            try:
                return fn()
            finally:
                torch.set_num_threads(saved)

        model = _tiny_llama()
        masks = attach_masks(model, LINEARS, MaskLLMConfig())
        mask_train(masks, True)
        set_schedule_state(masks, 2.0, 100.0)
        held = with_threads(lambda: hold_samples(model, masks))
        samples = [held[n].detach().clone() for n in LINEARS]
        model(input_ids=IDS, labels=IDS).loss.backward()  # the model itself runs with the usual threads
        with_threads(lambda: step_surrogate(masks, 1e-3)).backward()
        return samples, [m.logits.grad.clone() for m in masks.values()]

    one, two = run(1), run(2)
    assert all(torch.equal(a, b) for a, b in zip(one[0], two[0]))
    assert all(torch.equal(a, b) for a, b in zip(one[1], two[1]))
    assert len({float(s.sum()) for s in one[0]}) > 1  # samples differ between layers (own generators)
