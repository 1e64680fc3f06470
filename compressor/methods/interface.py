"""What a one-shot method is to the rest of the framework, and the registry of them.

A method is an object (``OneShotMethod``) that says which input statistics it needs, what its options
are, what a layer costs, whether its rows may be solved apart, and how to solve one layer. Pipelines,
configs and searches look methods up by name in ``METHODS``; adding one is a class with ``@register``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from compressor.calibration.stats import InputStats, StatsKind
from compressor.config.base import StrictModel
from compressor.errors import ConfigError
from compressor.sparsity import NM, SparsityTarget


@dataclass
class LayerJob:
    name: str  # weight name, e.g. "model.layers.3.mlp.down_proj.weight"
    method: str
    sparsity: SparsityTarget
    options: Any  # the method's options model
    sparsegpt: Optional[Any] = None  # SparseGPTOptions for a SparseGPT warm start


@dataclass
class LayerResult:
    name: str
    mask: torch.Tensor  # bool (out, in)
    weight: Optional[torch.Tensor]  # new weight if the method changed the kept values, else None
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)  # method-specific report items
    warm_start_mask: Optional[torch.Tensor] = None  # refinement methods: the mask they started from


class NoOptions(StrictModel):
    pass


class OneShotMethod:
    """One one-shot method. Subclasses set the class attributes and implement ``solve``; the defaults
    describe a cheap method that decides each row on its own at N:M."""

    name: str = ""
    options: type[StrictModel] = NoOptions  # its options model (a `prune` config section of the same name)
    stats: StatsKind = "none"  # the input statistics ``solve`` reads
    stackable: bool = True  # its report items are sums over rows, so layers on one input may be stacked
    slices_pay: bool = False  # a layer is costly enough that cutting it into row slices can shorten a block

    def cost(self, rows: int, cols: int) -> float:
        """Relative cost of solving a (rows, cols) weight once its shared factor exists, in the units of
        ``compressor.pipelines.sequential``'s cost model (about one row-column of SparseGPT's sweep)."""
        return float(rows * cols)

    def factor_cost(self, cols: int) -> float:
        return 0.0

    def row_separable(self, level: SparsityTarget) -> bool:
        """Whether a slice of the rows solved alone gives that slice of the whole result."""
        return isinstance(level, NM)

    def has_shared_factor(self, job: LayerJob) -> bool:
        return False

    def shared_factor(self, job: LayerJob, stats: InputStats) -> Optional[Any]:
        """The part of a job that depends on its statistics only, computed once per input group."""
        return None

    def solve(self, job: LayerJob, weight: torch.Tensor, stats: InputStats, factor: Optional[Any]) -> LayerResult:
        raise NotImplementedError


METHODS: dict[str, OneShotMethod] = {}


def register(cls: type[OneShotMethod]) -> type[OneShotMethod]:
    """Class decorator: make ``cls()`` available under ``cls.name``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    METHODS[cls.name] = cls()
    return cls


def get_method(name: str) -> OneShotMethod:
    try:
        return METHODS[registered_name(name)]
    except ValueError as e:
        raise ConfigError(str(e)) from None


def registered_name(name: str) -> str:
    """A config validator's check of a method name (pydantic reports a ValueError with the field)."""
    if name not in METHODS:
        raise ValueError(f"unknown one-shot method {name!r}; registered methods: {', '.join(sorted(METHODS))}")
    return name


def section_options(cfg: StrictModel, name: str) -> Any:
    """A method's options from a config holding one section per method (``sparsegpt: {damp: ...}``): its
    section if the config has one by the method's name, else the defaults of its options model."""
    method = get_method(name)
    return getattr(cfg, name) if name in type(cfg).model_fields else method.options()
