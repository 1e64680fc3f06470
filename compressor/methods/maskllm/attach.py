"""Attach learnable masks to a model's linears, drive them, and bake them back into plain weights."""

from __future__ import annotations

from typing import Mapping, Optional

import torch
from torch import nn
from torch.nn.utils import parametrize

from compressor.methods.maskllm.config import MaskLLMConfig
from compressor.methods.maskllm.mask import DTYPES, NMMaskParametrization

Masks = dict[str, NMMaskParametrization]


def attach_masks(model: nn.Module, names: list[str], cfg: MaskLLMConfig,
                 priors: Optional[Mapping[str, torch.Tensor]] = None, seed: int = 0) -> Masks:
    """Mask the ``weight`` of each named module (e.g. "model.layers.0.mlp.down_proj").

    All model parameters are frozen; with ``cfg.train_weights`` the masked weights train too.
    ``priors`` maps weight names ("...down_proj.weight") to bool masks that initialise the logits.
    """
    for p in model.parameters():
        p.requires_grad_(False)
    masks: Masks = {}
    for i, name in enumerate(names):
        module = model.get_submodule(name)
        out_features, in_features = module.weight.shape
        mask = NMMaskParametrization(out_features, in_features, cfg.sparsity, init_std=cfg.init_std,
                                     dtype=DTYPES[cfg.logits_dtype], seed=seed * 100_003 + i, name=name)
        if priors is not None:
            mask.init_from_prior(priors[f"{name}.weight"], cfg.prior_strength)
        parametrize.register_parametrization(module, "weight", mask)
        module.parametrizations.weight.original.requires_grad_(cfg.train_weights)
        masks[name] = mask
    return masks


def set_schedule_state(masks: Masks, tau: float, kappa: float) -> None:
    for m in masks.values():
        m.tau, m.kappa = tau, kappa


def mask_train(masks: Masks, learning: bool) -> None:
    """Soft Gumbel-Softmax masks (learning) or argmax masks (evaluation, export)."""
    for m in masks.values():
        m.hard = not learning


def sparse_weight_regularizer(masks: Masks) -> torch.Tensor:
    """Sum of ||W * mask||^2 over the masked layers, from the latest forward pass."""
    terms = [m.last_masked.float().pow(2).sum() for m in masks.values() if m.last_masked is not None]
    return torch.stack(terms).sum() if terms else torch.zeros(())


@torch.no_grad()
def mask_stats(masks: Masks, prev_argmax: Optional[Mapping[str, torch.Tensor]] = None) -> dict[str, float]:
    groups = changed = 0
    max_prob = 0.0
    for name, m in masks.items():
        argmax = m.argmax_patterns()
        n = argmax.numel()
        groups += n
        max_prob += float(m.max_prob()) * n
        if prev_argmax is not None:
            changed += int((argmax != prev_argmax[name]).sum())
    return {"max_prob": max_prob / max(groups, 1), "flip_rate": changed / max(groups, 1)}


def mask_memory_bytes(masks: Masks) -> dict[str, float]:
    """Bytes per masked weight: logits, their gradient, and AdamW's two moments."""
    weights = sum(m.shape[0] * m.shape[1] for m in masks.values())
    logits = sum(m.logits.numel() * m.logits.element_size() for m in masks.values())
    per = logits / max(weights, 1)
    return {"logits": per, "gradient": per, "adamw_state": 2 * per, "total": 4 * per, "masked_weights": weights}


@torch.no_grad()
def remove_masks(model: nn.Module, bake: bool = True) -> None:
    """Remove every mask; with ``bake`` the weight becomes W * hard mask (a plain nn.Linear again)."""
    for module in list(model.modules()):
        if parametrize.is_parametrized(module, "weight"):
            for p in module.parametrizations.weight:
                if isinstance(p, NMMaskParametrization):
                    p.hard = True
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=bake)
