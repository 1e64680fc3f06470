"""Evaluation precision: a narrower model is cast up and back exactly; a wider one is evaluated as a copy."""

import torch
from torch import nn

from compressor.eval.precision import eval_precision, model_dtype


def test_same_precision_is_the_model_itself():
    model = nn.Linear(4, 4)
    with eval_precision(model, "float32") as evaluated:
        assert evaluated is model


def test_narrower_model_is_cast_up_in_place_and_back_exactly():
    model = nn.Linear(8, 8).to(torch.bfloat16)
    before = model.weight.detach().clone()
    with eval_precision(model, "float32") as evaluated:
        assert evaluated is model and model_dtype(model) == torch.float32
    assert model.weight.dtype == torch.bfloat16 and torch.equal(model.weight, before)


def test_wider_model_is_evaluated_as_a_cast_copy():
    model = nn.Linear(8, 8)
    before = model.weight.detach().clone()
    with eval_precision(model, "bfloat16") as evaluated:
        assert evaluated is not model and model_dtype(evaluated) == torch.bfloat16
    assert model.weight.dtype == torch.float32 and torch.equal(model.weight, before)
