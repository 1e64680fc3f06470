"""train.lr_scale / train.warmup_steps: the factor per optimizer step, its validation, and that a backend sets
every param group's learning rate from its configured value (not from whatever the optimizer holds)."""

import pytest
import torch

from compressor.config.base import validate_config
from compressor.errors import ConfigError
from compressor.training.backends import SingleProcessBackend, scale_learning_rates
from compressor.training.config import TrainConfig


def test_the_default_keeps_every_learning_rate():
    cfg = TrainConfig(steps=5)
    assert [cfg.lr_scale_at(s) for s in range(5)] == [1.0] * 5


def test_linear_warmup_then_the_schedule_over_the_remaining_steps():
    cfg = validate_config(TrainConfig, {"steps": 7, "warmup_steps": 3,
                                        "lr_scale": {"start": 1.0, "end": 0.0, "kind": "linear"}})
    assert [cfg.lr_scale_at(s) for s in range(7)] == pytest.approx([1 / 3, 2 / 3, 1.0, 1.0, 2 / 3, 1 / 3, 0.0])


@pytest.mark.parametrize("data, message", [
    ({"steps": 4, "warmup_steps": 4}, "warmup_steps (4) must be below train.steps (4)"),
    ({"steps": 4, "lr_scale": {"start": 1.0, "end": -0.1}}, "lr_scale must stay >= 0"),
])
def test_impossible_schedules_fail_at_load_naming_the_field(data, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        validate_config(TrainConfig, data)


def test_a_backend_scales_each_group_from_its_configured_rate():
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(3))
    backend = SingleProcessBackend()
    backend.setup(torch.nn.Linear(1, 1), [{"params": [a], "lr": 0.1}, {"params": [b], "lr": 1e-3}], 1, 1)
    backend.scale_lr(0.5)
    backend.scale_lr(0.25)  # from the configured rates, not compounding on the last step's
    assert [g["lr"] for g in backend.optimizer.param_groups] == pytest.approx([0.025, 2.5e-4])
    with pytest.raises(ValueError, match="2 optimizer param groups but 1 configured"):
        scale_learning_rates(backend.optimizer.param_groups, [0.1], 1.0)
