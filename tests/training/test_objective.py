"""The distillation objective against a brute-force KL, and through `compressor learn` for a weight learner."""

import math

import pytest
import torch
from types import SimpleNamespace

from compressor.training.objective import Distillation, distillation_kl


def test_kl_matches_a_brute_force_sum():
    gen = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(2, 3, 5, generator=gen), torch.randn(2, 3, 5, generator=gen)
    t = 2.0
    total = 0.0
    for b in range(2):
        for i in range(3):
            p = torch.softmax(teacher[b, i] / t, -1).tolist()
            q = torch.softmax(student[b, i] / t, -1).tolist()
            total += sum(pk * math.log(pk / qk) for pk, qk in zip(p, q))
    assert float(distillation_kl(student, teacher, t)) == pytest.approx(total / 6 * t * t, rel=1e-5)
    assert float(distillation_kl(teacher, teacher, t)) == pytest.approx(0.0, abs=1e-6)


class _Teacher(torch.nn.Module):
    def __init__(self, logits):
        super().__init__()
        self.logits = logits
        self.w = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, use_cache=False):
        return SimpleNamespace(logits=self.logits)


def test_mix_weights_the_next_token_loss_and_the_kl():
    gen = torch.Generator().manual_seed(1)
    teacher, student = torch.randn(1, 4, 6, generator=gen), torch.randn(1, 4, 6, generator=gen)
    outputs = SimpleNamespace(loss=torch.tensor(3.0), logits=student)
    ids = torch.zeros(1, 4, dtype=torch.long)
    kl = distillation_kl(student[:, :-1], teacher[:, :-1], 1.0)
    assert torch.allclose(Distillation(_Teacher(teacher), 0.25, 1.0)(outputs, ids), 0.75 * 3.0 + 0.25 * kl)
    assert torch.allclose(Distillation(_Teacher(teacher), 1.0, 1.0)(outputs, ids), kl)
    with pytest.raises(ValueError, match="weight"):
        Distillation(_Teacher(teacher), 0.0, 1.0)


def test_learn_with_distillation_from_the_dense_model(tmp_path, tiny_llama_dir, text_file, monkeypatch):
    from compressor.runs.learn import run_learn
    from tests.training.test_learners import _cfg

    import compressor.runs.learn as learn

    made = []
    real = learn.make_objective
    monkeypatch.setattr(learn, "make_objective", lambda cfg: made.append(real(cfg)) or made[-1])
    cfg = _cfg(tiny_llama_dir, text_file, "srste", **{"evaluation.enabled": False, "train.steps": 2},
               distill={"weight": 0.5, "temperature": 2.0})
    report = run_learn(cfg, tmp_path / "run")
    assert isinstance(made[0], Distillation) and made[0].weight == 0.5
    assert report["pattern_ok"] and all(not p.requires_grad for p in made[0].teacher.parameters())
