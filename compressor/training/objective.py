"""What a micro-batch minimises before the learner adds its terms: the next-token loss, or a
knowledge-distillation mix with the KL divergence to a teacher's (the dense model's) logits."""

from __future__ import annotations

from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn


class Objective(Protocol):
    def __call__(self, outputs: Any, ids: torch.Tensor) -> torch.Tensor:
        """``outputs``: the model's output on ``ids`` (B, T) with ``labels=ids`` (``.loss``, ``.logits``)."""


def next_token(outputs: Any, ids: torch.Tensor) -> torch.Tensor:
    """The mean next-token cross-entropy the model computed from ``labels=ids``."""
    return outputs.loss


def distillation_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 x mean over positions of KL(softmax(teacher / T) || softmax(student / T)), in float32.

    Logits (B, T, V); the T^2 factor keeps the gradient's scale independent of the temperature.
    """
    log_p_student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_p_teacher = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    kl = F.kl_div(log_p_student, log_p_teacher, log_target=True, reduction="none").sum(dim=-1)  # (B, T)
    return kl.mean() * temperature**2


class Distillation:
    """(1 - weight) x next-token loss + weight x ``distillation_kl`` to a frozen teacher's logits.

    The logits of the positions that predict a next token (all but the last) are compared, as the
    next-token loss compares them with the labels.
    """

    def __init__(self, teacher: nn.Module, weight: float, temperature: float) -> None:
        if not 0.0 < weight <= 1.0 or not temperature > 0:
            raise ValueError(f"distillation needs 0 < weight <= 1 and temperature > 0, got {weight} and {temperature}")
        self.teacher, self.weight, self.temperature = teacher.eval(), weight, temperature
        for p in teacher.parameters():
            p.requires_grad_(False)

    def __call__(self, outputs: Any, ids: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            teacher = self.teacher(input_ids=ids, use_cache=False).logits[:, :-1]  # (B, T-1, V)
        kl = distillation_kl(outputs.logits[:, :-1], teacher, self.temperature)
        if self.weight == 1.0:
            return kl
        return (1.0 - self.weight) * outputs.loss + self.weight * kl
