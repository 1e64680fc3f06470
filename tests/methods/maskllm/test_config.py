"""Schedules and the MaskLLM config."""

import math

import pytest

from compressor.config.base import validate_config
from compressor.errors import ConfigError
from compressor.methods.maskllm import MaskLLMConfig, Schedule
from compressor.sparsity import NM


def test_linear_schedule_hits_both_ends_and_interpolates():
    s = Schedule(start=4.0, end=0.05)
    total = 101
    values = [s.value_at(i, total) for i in range(total)]
    assert values[0] == 4.0 and values[-1] == pytest.approx(0.05) and values[50] == pytest.approx((4.0 + 0.05) / 2)
    assert all(a > b for a, b in zip(values, values[1:]))
    assert s.value_at(500, total) == pytest.approx(0.05)  # past the end: stays at the end


def test_cosine_schedule_matches_the_closed_form():
    c = Schedule(start=100.0, end=500.0, kind="cosine")
    for step in range(11):
        want = 100.0 + 400.0 * (1 - math.cos(math.pi * step / 10)) / 2
        assert c.value_at(step, 11) == pytest.approx(want)
    assert c.value_at(1, 11) - c.value_at(0, 11) < c.value_at(6, 11) - c.value_at(5, 11)  # slow start


def test_constant_schedule_and_degenerate_runs():
    assert Schedule.constant(2.0).value_at(7, 10) == 2.0
    assert Schedule(start=3.0, end=1.0).value_at(0, 1) == 3.0
    with pytest.raises(ValueError, match="total_steps"):
        Schedule(start=1.0, end=0.0).value_at(0, 0)
    with pytest.raises(ValueError, match="step"):
        Schedule(start=1.0, end=0.0).value_at(-1, 5)


def test_defaults_follow_the_paper():
    cfg = MaskLLMConfig()
    assert cfg.sparsity == NM(2, 4) and cfg.prior_strength == 3.0 and cfg.train_weights is False
    assert (cfg.tau.start, cfg.tau.end, cfg.kappa.start, cfg.kappa.end) == (4.0, 0.05, 100.0, 500.0)
    assert (cfg.regularizer.start, cfg.regularizer.end) == (1e-5, 0.0)


def test_config_round_trips_and_parses_sparsity():
    cfg = MaskLLMConfig(sparsity="4:8", tau={"start": 2.0, "end": 0.1, "kind": "cosine"}, logits_dtype="bfloat16")
    dumped = cfg.model_dump(mode="json")
    assert dumped["sparsity"] == "4:8"
    assert MaskLLMConfig.model_validate(dumped) == cfg
    assert MaskLLMConfig(sparsity=[1, 4]).sparsity == NM(1, 4)


@pytest.mark.parametrize("data, message", [
    ({"sparsity": "8:16"}, "12870 keep-patterns"),
    ({"sparsity": 0.5}, "sparsity"),
    ({"tau": {"start": 1.0, "end": 0.0}}, "tau must stay finite and > 0"),
    ({"kappa": {"start": -1.0, "end": 5.0}}, "kappa"),
    ({"regularizer": {"start": -1e-5, "end": 0.0}}, "lambda"),
    ({"tau": {"start": 1.0, "end": 0.1, "kind": "exponential"}}, "tau.kind"),
    ({"prior_strength": -1.0}, "prior_strength"),
    ({"logits_dtype": "float16"}, "logits_dtype"),
    ({"logit_lr": 1e-3}, "unknown key"),
])
def test_invalid_configs_name_the_problem(data, message):
    with pytest.raises(ConfigError, match=message):
        validate_config(MaskLLMConfig, data, "maskllm")
