"""Learners that train the weights of the targeted linears: fixed-mask fine-tuning, SR-STE, PDP, BDWP
and the dense control. Their state is the weights themselves; every rank holds them whole (DeepSpeed
ZeRO 0-2), and the mask each method ends with is a function of the weights (or, fixed-mask, given)."""

from __future__ import annotations

from typing import Any, Mapping, Optional, Union

import torch
from torch import nn
from torch.nn.utils import parametrize

from compressor.errors import ConfigError
from compressor.methods.sparse_training import BDWPLinear, FixedMask, PDPWeight, SRSTEWeight
from compressor.methods.sparse_training.base import WeightRule
from compressor.methods.sparse_training.config import (
    BDWPMethod, DenseMethod, FixedMaskMethod, PDPMethod, SRSTEMethod,
)
from compressor.methods.sparse_training.flops import PassDensities
from compressor.sparsity import NM, assert_nm, pack_bits, unpack_bits
from compressor.training.backends import Backend
from compressor.training.learners.base import FinalModel, Learner

Layer = Union[WeightRule, BDWPLinear, None]  # None: the dense control's plain linear


class WeightLearner(Learner):
    """The shared part: attach, the optimizer's groups, penalties, statistics, checkpoints and baking."""

    lr_keys = "method.lr"

    def __init__(self, cfg) -> None:
        self.cfg = cfg
        self.weights: dict[str, nn.Parameter] = {}  # module name -> the trained weight
        self.layers: dict[str, Layer] = {}
        self.prev_masks: dict[str, torch.Tensor] = {}  # packed hard masks at the previous log step
        self.lam = 0.0  # the sparse-refined weight of this step (SR-STE, BDWP)

    # -- what each method decides -------------------------------------------------------------------
    def make_rule(self, name: str, weight: torch.Tensor) -> Optional[WeightRule]:
        """The parametrization of ``name``'s weight (None: no parametrization)."""
        return None

    def install(self, model: nn.Module, name: str, linear: nn.Module) -> tuple[nn.Parameter, Layer]:
        rule = self.make_rule(name, linear.weight)
        if rule is None:
            return linear.weight, None
        parametrize.register_parametrization(linear, "weight", rule)
        rule.train(False)  # registration copied the host's mode; start in evaluation (hard) mode
        return linear.parametrizations.weight.original, rule

    def hard_mask(self, name: str) -> Optional[torch.Tensor]:
        layer = self.layers[name]
        if layer is None:
            return None
        return layer.hard_mask() if isinstance(layer, BDWPLinear) else layer.hard_mask(self.weights[name])

    # -- the interface ------------------------------------------------------------------------------
    def attach(self, model: nn.Module, names: list[str], backend: Optional[Backend] = None) -> list[dict]:
        self.model = model
        for name in names:
            linear = model.get_submodule(name)
            weight = getattr(linear, "weight", None)
            if not isinstance(linear, nn.Linear) or weight is None or weight.dim() != 2:
                raise ValueError(f"{self.kind}: {name} is not a plain nn.Linear with a 2-D weight")
            if parametrize.is_parametrized(linear, "weight"):
                raise ValueError(f"{self.kind}: {name}.weight is already parametrized")
        for p in model.parameters():
            p.requires_grad_(False)
        for name in names:
            self.weights[name], self.layers[name] = self.install(model, name, model.get_submodule(name))
            self.weights[name].requires_grad_(True)
        return [{"params": list(self.weights.values()), "lr": self.cfg.lr}]

    def micro_loss(self, objective: torch.Tensor) -> torch.Tensor:
        if self.lam <= 0:
            return objective
        penalties = [layer.penalty for layer in self.layers.values()]
        if any(p is None for p in penalties):
            raise RuntimeError(f"{self.kind}: a layer ran no training forward to take its sparse-refined term from")
        return objective + self.lam * torch.stack(penalties).sum()

    def after_step(self) -> None:
        for layer in self.layers.values():
            if layer is not None:
                layer.weights_changed()

    def set_learning(self, learning: bool) -> None:
        for layer in self.layers.values():
            if layer is not None:
                layer.train(learning)

    def start(self, backend: Backend) -> None:
        self.prev_masks = self._packed_masks()

    def stats(self, backend: Backend) -> dict[str, float]:
        """flip_rate: the fraction of weights whose hard-mask bit changed since the previous log step."""
        current = self._packed_masks()
        if not current:
            return {}
        changed = total = 0
        for name, packed in current.items():
            cols = self.weights[name].shape[1]
            before, now = unpack_bits(self.prev_masks[name], cols), unpack_bits(packed, cols)
            changed += int((before != now).sum())
            total += now.numel()
        self.prev_masks = current
        return {"flip_rate": changed / max(total, 1)}

    def _packed_masks(self) -> dict[str, torch.Tensor]:
        masks = ((n, self.hard_mask(n)) for n in self.layers)
        return {n: pack_bits(m.cpu()) for n, m in masks if m is not None}

    def hard_masks(self, backend: Backend) -> Optional[dict[str, torch.Tensor]]:
        if all(layer is None for layer in self.layers.values()):
            return None
        return {f"{n}.weight": self.hard_mask(n).cpu() for n in self.layers} if backend.is_main else {}

    def state(self, backend: Backend) -> dict[str, Any]:
        return {"weights": {n: w.detach().clone() for n, w in self.weights.items()}} if backend.is_main else {}

    @torch.no_grad()
    def load_state(self, shared: dict[str, Any], mine: dict[str, Any], backend: Backend) -> None:
        for name, w in self.weights.items():
            w.copy_(shared["weights"][name])
        self.after_step()

    @torch.no_grad()
    def finish(self, backend: Backend) -> FinalModel:
        masks: dict[str, torch.Tensor] = {}
        for name, layer in self.layers.items():
            mask = self.hard_mask(name)
            if mask is None:
                continue
            masks[f"{name}.weight"] = mask.cpu()
            if isinstance(layer, BDWPLinear):
                parent, _, child = name.rpartition(".")
                setattr(self.model.get_submodule(parent), child, layer.to_linear(bake=True))
            else:
                self.weights[name].mul_(mask.to(self.weights[name].dtype))  # the weight becomes W * hard mask
                parametrize.remove_parametrizations(self.model.get_submodule(name), "weight", leave_parametrized=False)
        for w in self.weights.values():
            w.requires_grad_(False)
        return FinalModel(masks=(masks or None) if backend.is_main else None)


class FixedMaskLearner(WeightLearner):
    kind = "fixed_mask"

    def __init__(self, cfg: FixedMaskMethod, priors: Mapping[str, torch.Tensor]) -> None:
        super().__init__(cfg)
        self.priors = priors

    def make_rule(self, name: str, weight: torch.Tensor) -> WeightRule:
        mask = self.priors.get(f"{name}.weight", self.priors.get(name))
        if mask is None:
            raise ConfigError(f"fixed_mask: the prior has no mask for {name}")
        if tuple(mask.shape) != tuple(weight.shape):
            raise ConfigError(f"fixed_mask: the prior's mask for {name} is {tuple(mask.shape)}, its weight "
                              f"{tuple(weight.shape)}")
        if isinstance(self.cfg.sparsity, NM):
            assert_nm(mask, self.cfg.sparsity, f"fixed_mask: the prior's mask for {name}")
        return FixedMask(mask.to(weight.device), name)

    def gemm_densities(self) -> PassDensities:
        return _forward_only(self.cfg.sparsity)


class SRSTELearner(WeightLearner):
    kind = "srste"

    def make_rule(self, name: str, weight: torch.Tensor) -> WeightRule:
        return SRSTEWeight(self.cfg.sparsity, tuple(weight.shape), name)

    def begin_step(self, step: int, total: int) -> dict[str, float]:
        return {"lambda_w": self._set_lambda(self.cfg.lambda_w.value_at(step, total))}

    def _set_lambda(self, lam: float) -> float:
        self.lam = lam
        for layer in self.layers.values():
            layer.track_penalty = lam > 0
        return lam

    def gemm_densities(self) -> PassDensities:
        return _forward_only(self.cfg.sparsity)


class PDPLearner(WeightLearner):
    kind = "pdp"

    def make_rule(self, name: str, weight: torch.Tensor) -> WeightRule:
        return PDPWeight(self.cfg.sparsity, tuple(weight.shape), name)

    def begin_step(self, step: int, total: int) -> dict[str, float]:
        tau, ramp = self.cfg.tau.value_at(step, total), self.cfg.ramp_at(step, total)
        for layer in self.layers.values():
            layer.set_schedule(tau, ramp)
        return {"tau_rel": tau, "ramp": ramp}


class BDWPLearner(SRSTELearner):
    kind = "bdwp"

    def install(self, model: nn.Module, name: str, linear: nn.Module) -> tuple[nn.Parameter, Layer]:
        swapped = BDWPLinear.from_linear(linear, self.cfg.sparsity, name)
        swapped.train(False)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, swapped)
        return swapped.weight, swapped

    def gemm_densities(self) -> PassDensities:
        d = self.cfg.sparsity.density
        return PassDensities(d, d, 1.0)


class DenseLearner(WeightLearner):
    """The control: the same weights, the same data, no mask; ends dense."""

    kind = "dense"


def _forward_only(sparsity) -> PassDensities:
    """A mask along the input dimension: N:M work in the forward only (the input gradient reduces over the
    output dimension, the weight gradient is dense); unstructured masks are not N:M kernel work."""
    return PassDensities(sparsity.density, 1.0, 1.0) if isinstance(sparsity, NM) else PassDensities.dense()


LEARNERS = {"fixed_mask": FixedMaskLearner, "srste": SRSTELearner, "pdp": PDPLearner, "bdwp": BDWPLearner,
            "dense": DenseLearner}
METHOD_CONFIGS = (FixedMaskMethod, SRSTEMethod, PDPMethod, BDWPMethod, DenseMethod)
