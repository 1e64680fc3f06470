"""Attach learnable masks to a model's linears, drive them, measure them, and bake them back."""

from __future__ import annotations

import hashlib
from contextlib import nullcontext
from typing import Callable, ContextManager, Iterable, Mapping, Optional, Protocol, Union

import torch
from torch import nn
from torch.nn.utils import parametrize

from compressor.methods.maskllm.config import MaskLLMConfig
from compressor.methods.maskllm.mask import NMMaskParametrization
from compressor.precision import DTYPES
from compressor.sparsity import NM
from compressor.utils.threads import thread_map

Masks = dict[str, NMMaskParametrization]

# Optimizer state tensors per parameter, each the parameter's size and dtype (torch's defaults).
OPTIMIZER_STATES = {"adamw": 2, "adam": 2, "sgd_momentum": 1, "sgd": 0}


def layer_seed(seed: int, name: str) -> int:
    """A per-layer generator seed from the run seed and the layer name (independent of layer order)."""
    digest = hashlib.blake2b(f"{seed}:{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1  # non-negative int64


def _prior_for(priors: Mapping[str, torch.Tensor], name: str) -> torch.Tensor:
    for key in (name, f"{name}.weight"):
        if key in priors:
            return priors[key]
    sample = ", ".join(list(priors)[:3])
    raise ValueError(f"no prior mask for layer {name} (priors are keyed by {name!r} or {name + '.weight'!r}; "
                     f"given keys look like: {sample or 'none'})")


class Sharding(Protocol):
    """Where parameters live between uses: whole on this process (``WHOLE``), or partitioned across ranks
    (``compressor.training.backends.Backend`` under ZeRO-3), gathered one layer at a time when read."""

    def model_init(self, dtype: torch.dtype = torch.float32) -> ContextManager[None]: ...

    def full_shape(self, param: torch.Tensor) -> torch.Size: ...

    def gathered(self, params: Iterable[torch.Tensor], write: bool = False) -> ContextManager[None]: ...


class _Whole:
    def model_init(self, dtype: torch.dtype = torch.float32) -> ContextManager[None]:
        return nullcontext()

    def full_shape(self, param: torch.Tensor) -> torch.Size:
        return param.shape

    def gathered(self, params: Iterable[torch.Tensor], write: bool = False) -> ContextManager[None]:
        return nullcontext()


WHOLE: Sharding = _Whole()
# A prior: masks by module (or weight) name, or a function of a layer's name and its (gathered) weight
Prior = Union[Mapping[str, torch.Tensor], Callable[[str, torch.Tensor], torch.Tensor]]
# Called for each layer while its weight and logits are whole (e.g. transfer logits, statistics)
LayerHook = Callable[[str, NMMaskParametrization, torch.Tensor], None]


def attach_masks(
    model: nn.Module,
    names: list[str],
    cfg: MaskLLMConfig,
    priors: Optional[Prior] = None,
    seed: int = 0,
    levels: Optional[Mapping[str, NM]] = None,
    sharding: Sharding = WHOLE,
    on_layer: Optional[LayerHook] = None,
) -> Masks:
    """Mask the ``weight`` (out, in) of each named module, e.g. "model.layers.0.mlp.down_proj".

    Every model parameter is frozen except the new logits; with ``cfg.train_weights`` the masked
    weights train too. ``priors`` maps module (or "<module>.weight") names to (out, in) masks that
    initialise the logits with ``cfg.prior_strength`` (or is a function of the name and the weight that
    returns that mask). All layers are checked before any is changed.
    Masks start in eval (hard) mode; ``mask_train(masks, True)`` or ``model.train()`` makes them soft.
    ``levels``: each module's own N:M (a mixed sparsity plan); default ``cfg.sparsity`` for all.
    ``sharding``: partitioned weights (ZeRO-3) get partitioned logits, made under its ``model_init``, and
    each layer's prior, hook and registration run with its weight and logits gathered, one layer at a time.
    """
    if not names:
        raise ValueError("attach_masks: no layer names given; list the linears to mask")
    if len(set(names)) != len(names):
        raise ValueError(f"attach_masks: duplicate layer names in {names}")
    shapes: dict[str, torch.Size] = {}
    for name in names:
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"attach_masks: the model has no module {name!r}") from None
        weight = getattr(module, "weight", None)
        shape = sharding.full_shape(weight) if isinstance(weight, torch.Tensor) else None
        if shape is None or len(shape) != 2:
            raise ValueError(f"attach_masks: {name} has no 2-D weight (out, in) to mask ({type(module).__name__})")
        if parametrize.is_parametrized(module, "weight"):
            raise ValueError(f"attach_masks: {name}.weight is already parametrized; call remove_masks(model) first")
        shapes[name] = shape
    masks: Masks = {}
    with sharding.model_init(DTYPES[cfg.logits_dtype]):  # partitioned logits: each partitioned once it is made
        for name in names:
            device = model.get_submodule(name).weight.device
            masks[name] = NMMaskParametrization(
                shapes[name][0], shapes[name][1], levels[name] if levels is not None else cfg.sparsity,
                init_std=cfg.init_std, dtype=DTYPES[cfg.logits_dtype], seed=layer_seed(seed, name), name=name,
                device=device)
    if isinstance(priors, Mapping):  # checked before any layer changes
        for name, mask in masks.items():
            mask.check_prior(_prior_for(priors, name))
    for p in model.parameters():
        p.requires_grad_(False)
    for name, mask in masks.items():
        module = model.get_submodule(name)
        weight = module.weight
        with sharding.gathered([weight, mask.logits], write=True):
            if priors is not None:
                prior = _prior_for(priors, name) if isinstance(priors, Mapping) else priors(name, weight.detach())
                mask.init_from_prior(prior, cfg.prior_strength)
            if on_layer is not None:
                on_layer(name, mask, weight)
            parametrize.register_parametrization(module, "weight", mask)  # draws no noise
        mask.train(False)  # registration copied the host's mode; start hard whatever the model's mode
        module.parametrizations.weight.original.requires_grad_(cfg.train_weights)
    return masks


@torch.no_grad()
def prior_agreement(masks: Masks, priors: Mapping[str, torch.Tensor]) -> float:
    """Fraction of groups whose argmax pattern is the prior's: 1.0 means the hard mask at step 0 is the prior.

    With the random initial logits, a weak ``prior_strength`` leaves some groups on another pattern
    (strength 3: about 6% for 2:4), which costs quality before learning starts.
    """
    same = total = 0
    for name, m in masks.items():
        kept, groups = layer_agreement(m, _prior_for(priors, name))
        same, total = same + kept, total + groups
    return same / max(total, 1)


@torch.no_grad()
def layer_agreement(m: NMMaskParametrization, prior: torch.Tensor) -> tuple[int, int]:
    """(groups whose argmax pattern is the prior's, groups) of one mask (its logits whole)."""
    prior = prior.to(m.logits.device).bool().reshape(m.shape[0], -1, m.nm.m)  # (out, G, M)
    hard = m.hard_mask().reshape(prior.shape)
    return int((hard == prior).all(dim=-1).sum()), prior.shape[0] * prior.shape[1]


def set_schedule_state(masks: Masks, tau: float, kappa: float) -> None:
    """Temperature and logit scale of every mask's next samples."""
    for m in masks.values():
        m.set_schedule(tau, kappa)


def set_noise(masks: Masks, enabled: bool) -> None:
    """Gumbel noise in every mask's training samples, or none: softmax(kappa * logits / tau), deterministic."""
    for m in masks.values():
        m.set_noise(enabled)


def mask_train(masks: Masks, learning: bool) -> None:
    """Soft Gumbel-Softmax masks (learning) or argmax masks (evaluation, export)."""
    for m in masks.values():
        m.train(learning)


def _collect(source: Union[nn.Module, Mapping[str, NMMaskParametrization]]) -> list[NMMaskParametrization]:
    if isinstance(source, nn.Module):
        return [m for m in source.modules() if isinstance(m, NMMaskParametrization)]
    return list(source.values())


def sparse_weight_regularizer(source: Union[nn.Module, Mapping[str, NMMaskParametrization]]) -> torch.Tensor:
    """Sum over masked layers of ||W * mask||^2 (float32 scalar) for the masks of the latest forward pass.

    The training loss subtracts ``lambda *`` this, rewarding masks that keep large weights.
    """
    masks = _collect(source)
    if not masks:
        raise ValueError("sparse_weight_regularizer: no learnable masks found")
    terms = []
    for m in masks:
        if m.last_masked is None:
            raise RuntimeError(
                f"sparse_weight_regularizer: {m.name} has no soft-mask forward pass to regularise; "
                "call mask_train(masks, True) and run the model forward first"
            )
        terms.append(m.last_masked.float().pow(2).sum())
    return torch.stack(terms).sum()


def hold_samples(source: Union[nn.Module, Mapping[str, torch.Tensor]], masks: Masks,
                 dtype: Optional[torch.dtype] = None) -> dict[str, torch.Tensor]:
    """Draw one soft sample per mask for a whole optimizer step: {name: W * mask, a leaf served to forwards}.

    ``source`` is the model the masks were attached to by name (``attach_masks``), or the unmasked
    weights W (out, in) by mask name, for masks whose names are not module paths of one model (a
    megatron pipeline stage names them globally). Every forward until ``step_surrogate`` reuses the
    sample, so the cost of sampling (and of its backward) is paid once per step instead of once per
    micro-batch. Layers are sampled side by side on threads (each with its own generator, so the
    draws do not depend on the threading). ``dtype``: of the samples (see ``hold_sample``).
    """
    if isinstance(source, nn.Module):
        weights = {name: source.get_submodule(name).parametrizations.weight.original for name in masks}
    else:
        missing = [name for name in masks if name not in source]
        if missing:
            raise ValueError(f"hold_samples: no weight given for mask {missing[0]!r} "
                             f"({len(missing)} of {len(masks)} missing)")
        weights = dict(source)
    names = list(masks)
    held = thread_map(lambda n: masks[n].hold_sample(weights[n], dtype), names, cost=lambda n: masks[n].logits.numel())
    return dict(zip(names, held))


def release_samples(masks: Masks) -> None:
    """Drop held samples without using them (a step that failed before ``step_surrogate``)."""
    for m in masks.values():
        m.release_sample()


def step_surrogate(masks: Masks, lam: float) -> torch.Tensor:
    """Release the held samples; returns a scalar whose gradient is the step's gradient of the loss.

    Each mask turns the G = d loss / d (W * mask) its micro-batches accumulated, and the regulariser
    -lambda * ||W * mask||^2, into its parameters' gradients (``sample_gradients``, on threads); the
    surrogate is sum <p, grad p> over them, so one backward (through whichever engine owns the
    parameters, e.g. DeepSpeed's) delivers exactly those gradients. Its value is not a loss.
    """
    values = list(masks.values())
    grads = thread_map(lambda m: m.sample_gradients(lam), values, cost=lambda m: m.logits.numel())
    terms = [torch.dot(p.float().reshape(-1), g.reshape(-1)) for pairs in grads for p, g in pairs]
    if not terms:
        raise RuntimeError("step_surrogate: no micro-batch used the held masks; run the model forward in between")
    return torch.stack(terms).sum()


@torch.no_grad()
def mask_stats(
    masks: Union[Masks, Iterable[tuple[str, NMMaskParametrization]]],
    prev_argmax: Optional[Mapping[str, torch.Tensor]] = None,
    argmax_out: Optional[dict[str, torch.Tensor]] = None,
) -> dict[str, float]:
    """Mean max-probability over all groups and, given earlier ``argmax_patterns()``, the flip rate.

    ``flip_rate`` = fraction of groups whose argmax pattern changed since ``prev_argmax``. ``masks`` may
    be an iterator of (name, mask) that gathers each layer in turn (ZeRO-3). ``argmax_out`` receives
    each layer's pattern ids (uint8 on the CPU, a byte per group), the next call's ``prev_argmax``.
    """
    groups = changed = 0
    weighted_prob = 0.0
    for name, m in (masks.items() if isinstance(masks, Mapping) else masks):
        argmax = m.argmax_patterns()
        groups += argmax.numel()
        weighted_prob += m.max_prob() * argmax.numel()
        if prev_argmax is not None:
            changed += int((argmax != prev_argmax[name].to(argmax.device)).sum())
        if argmax_out is not None:
            argmax_out[name] = pattern_ids(argmax)
    stats = {"max_prob": weighted_prob / max(groups, 1), "groups": float(groups)}
    if prev_argmax is not None:
        stats["flip_rate"] = changed / max(groups, 1)
    return stats


def pattern_ids(argmax: torch.Tensor) -> torch.Tensor:
    """Argmax patterns kept between log steps: on the CPU in one byte each (at most 256 patterns), so
    no rank holds a model-sized int64 tensor on its device."""
    return argmax.to("cpu", torch.uint8)


def mask_memory_bytes(masks: Masks, optimizer: str = "adamw") -> dict[str, float]:
    """Bytes per masked weight spent on learning: logits, their gradient and the optimizer's state.

    Optimizer states are counted in the logits' dtype (torch keeps them like the parameter); the
    transient soft mask of a forward pass is not included.
    """
    if optimizer not in OPTIMIZER_STATES:
        raise ValueError(f"unknown optimizer {optimizer!r}; expected one of {sorted(OPTIMIZER_STATES)}")
    weights = sum(m.shape[0] * m.shape[1] for m in masks.values())
    # from the shapes, not the tensors: a partitioned (ZeRO-3) logits tensor is empty on this rank
    logits = sum(m.shape[0] * (m.shape[1] // m.nm.m) * m.patterns.shape[0] * m.logits.element_size()
                 for m in masks.values())
    per = logits / max(weights, 1)
    state = OPTIMIZER_STATES[optimizer] * per
    return {"logits": per, "gradient": per, "optimizer_state": state, "total": 2 * per + state,
            "masked_weights": float(weights)}


@torch.no_grad()
@torch.no_grad()
def store_frozen_weights(model: nn.Module, masks: Masks, dtype: torch.dtype) -> None:
    """Keep the frozen weights under ``masks`` in ``dtype`` (bf16 halves their memory; the products read
    them in bf16 anyway). Masks and samples stay float32; the weights must not be trained."""
    for name in masks:
        weight = model.get_submodule(name).parametrizations.weight.original
        if weight.requires_grad:
            raise ValueError(f"{name}: trained weights keep float32 masters; only frozen weights are stored in {dtype}")
        weight.data = weight.data.to(dtype)


def remove_masks(model: nn.Module, bake: bool = True) -> dict[str, torch.Tensor]:
    """Remove every learnable mask and return the final hard masks {module name: (out, in) bool}.

    ``bake=True``: each weight becomes the plain parameter W * hard mask (an nn.Linear is an nn.Linear
    again); ``bake=False``: the dense W comes back unchanged. Parameters stay frozen.
    """
    removed: dict[str, torch.Tensor] = {}
    for name, module in list(model.named_modules()):
        if not parametrize.is_parametrized(module, "weight"):
            continue
        plist = module.parametrizations.weight
        ours = [p for p in plist if isinstance(p, NMMaskParametrization)]
        if not ours:
            continue
        if len(ours) != len(plist):
            raise ValueError(f"remove_masks: {name}.weight has other parametrizations besides the mask; "
                             "remove those first")
        for p in ours:
            p.train(False)  # bake the argmax pattern, never a random sample
        removed[name] = ours[0].hard_mask()
        parametrize.remove_parametrizations(module, "weight", leave_parametrized=bake)
    return removed
