"""Per-layer (mixed) sparsity plans: a default level, per-layer levels, and a declared average.

A plan file (YAML or JSON) looks like::

    target: 0.625                       # optional: the declared parameter-weighted average sparsity
    default: "5:8"                      # every layer no key below names
    layers:
      model.layers.0.mlp.down_proj: "3:8"   # an exact linear name
      'model\\.layers\\.(2|3)\\..*_proj': "6:8"  # or a full-match regular expression over names

Levels are N:M patterns ("2:4", keep at most N of every M consecutive inputs) or unstructured
fractions (0.7 = prune 70% of the weights).

Which level a layer gets (``level_for``): a key equal to the layer's name wins; otherwise every key is a
full-match regex, and all regexes that match must agree on the level, else it is an error naming the
layer and the keys. So a plan means the same whatever order its keys are in (JSON objects carry no
order, and tools that rewrite a file may sort them); to carve an exception out of a regex, name the
layer exactly.

Average sparsity (BENCHMARK.md, "Per-layer (mixed) sparsity"): the pruned-weight count
P = sum over pruned linears of (out * in) * s(level), with s = (M - N) / M for N:M and the fraction
itself (as the decimal written, 0.7 = 7/10) for unstructured levels, in exact rational arithmetic;
embeddings and the LM head are never part of it. A declared ``target`` T is met when
|P - T * sum(out * in)| <= G weights, G = "one group of M": the largest M among the N:M levels the
layers use, or 1 (a single weight) when every level is unstructured. The slack only absorbs that
T * sum(out * in) need not be a whole number of groups (or weights); moving one N:M layer by one N
already moves P by out * in / M weights, so a plan within tolerance is as exact as its layers allow.
(Unstructured masks are cut per row at floor(in * s) weights, so their realised count can fall short
of the nominal one by less than one weight per row; the plan's average is the nominal one.)
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, Mapping, Optional

import yaml
from pydantic import Field, PrivateAttr, field_validator

from compressor.config.base import SparsityField, StrictModel, validate_config, yaml_load
from compressor.errors import ConfigError
from compressor.sparsity.nm import NM, SparsityTarget, Unstructured
from compressor.utils.fs import atomic_write_text

Shapes = Mapping[str, tuple[int, int]]  # linear name -> (out_features, in_features)


class PlanError(ConfigError):
    """A sparsity plan does not fit the model: a key matches no layer, a level cannot tile a layer's
    width, regexes disagree, or the average misses the declared target."""


def level_sparsity(level: SparsityTarget) -> Fraction:
    """The pruned fraction of a level, exactly: (M - N) / M, or the unstructured fraction as written."""
    if isinstance(level, NM):
        return Fraction(level.m - level.n, level.m)
    return Fraction(str(level.sparsity))  # str: 0.7 -> 7/10, not the binary float's 0.69999...


def group_size(level: SparsityTarget) -> int:
    """Weights per group: M for N:M; 1 for unstructured (any single weight may go)."""
    return level.m if isinstance(level, NM) else 1


def level_text(level: SparsityTarget) -> str:
    """The level as a plan file writes it: "3:8" or "0.7"."""
    return str(level) if isinstance(level, NM) else repr(float(level.sparsity))


def parse_level(text: str) -> SparsityTarget:
    """The inverse of ``level_text``: "3:8" -> NM(3, 8), "0.7" -> Unstructured(0.7)."""
    return NM.parse(text) if ":" in text else Unstructured(float(text))


def layer_shapes(targets) -> dict[str, tuple[int, int]]:
    """``{name: (out, in)}`` of ``compressor.models.layers.prunable_linears`` results, in order."""
    return {t.name: (t.out_features, t.in_features) for t in targets}


class SparsityPlan(StrictModel):
    default: SparsityField
    layers: dict[str, SparsityField] = {}  # exact linear names or full-match regexes -> level
    target: Optional[float] = Field(None, gt=0, lt=1)  # declared parameter-weighted average sparsity

    _patterns: dict[str, re.Pattern] = PrivateAttr(default_factory=dict)

    @field_validator("layers")
    @classmethod
    def _keys_compile(cls, layers: dict[str, Any]) -> dict[str, Any]:
        for key in layers:
            try:
                re.compile(key)
            except re.error as e:
                raise ValueError(f"key {key!r} is neither a layer name nor a valid regex: {e}") from None
        return layers

    def model_post_init(self, _context: Any) -> None:
        self._patterns = {key: re.compile(key) for key in self.layers}

    @classmethod
    def uniform(cls, level: SparsityTarget) -> "SparsityPlan":
        """The plan of today's single-sparsity run: every layer at ``level``, declared as its average."""
        return cls(default=level, target=float(level_sparsity(level)))

    @classmethod
    def from_levels(cls, levels: Mapping[str, SparsityTarget], target: Optional[float] = None) -> "SparsityPlan":
        """A compact plan for explicit per-layer levels (a search result): the level most layers have
        becomes the default (ties: the one met first), the others are listed by exact name."""
        counts: dict[SparsityTarget, int] = {}
        for level in levels.values():
            counts[level] = counts.get(level, 0) + 1
        default = max(counts, key=counts.get)
        return cls(default=default, layers={n: lv for n, lv in levels.items() if lv != default}, target=target)

    # --- resolution -------------------------------------------------------------------------------

    def level_for(self, name: str) -> SparsityTarget:
        """The level of linear ``name`` (see the module docstring for the rule)."""
        if name in self.layers:
            return self.layers[name]
        hits = {key: self.layers[key] for key, rx in self._patterns.items() if rx.fullmatch(name)}
        if len(set(hits.values())) > 1:
            found = ", ".join(f"{k!r} -> {v}" for k, v in hits.items())
            raise PlanError(f"{name}: regexes disagree on its level ({found}); add the exact name as a key")
        return next(iter(hits.values())) if hits else self.default

    def resolve(self, shapes: Shapes) -> "ResolvedPlan":
        """Every pruned linear's level, checked against the model: no key may match no layer, every
        N:M level's M must divide its layer's input width, and the average must meet ``target``."""
        if not shapes:
            raise PlanError("the model has no pruned linears to resolve the plan against")
        for key, rx in self._patterns.items():
            if key not in shapes and not any(rx.fullmatch(n) for n in shapes):
                raise PlanError(f"plan key {key!r} matches no pruned linear (names look like {next(iter(shapes))!r})")
        levels = {name: self.level_for(name) for name in shapes}
        for name, level in levels.items():
            width = shapes[name][1]
            if isinstance(level, NM) and width % level.m:
                raise PlanError(f"{name}: level {level} is impossible, its input width {width} is not divisible by "
                                f"M={level.m}")
        resolved = ResolvedPlan(levels, dict(shapes), self.target)
        if self.target is not None:
            resolved.check_average(self.target)
        return resolved

    # --- files ------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        data = self.model_dump(mode="json")
        out: dict[str, Any] = {} if self.target is None else {"target": data["target"]}
        out["default"] = data["default"]
        out["layers"] = data["layers"]
        return out

    def save(self, path: str | Path) -> Path:
        """Write atomically; ``.json`` gives JSON, ``.yaml`` / ``.yml`` YAML."""
        path = Path(path)
        if path.suffix == ".json":
            text = json.dumps(self.to_dict(), indent=2) + "\n"
        elif path.suffix in (".yaml", ".yml"):
            text = yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=False)
        else:
            raise PlanError(f"{path}: a plan file ends in .yaml, .yml or .json")
        atomic_write_text(path, text)
        return path

    @classmethod
    def load(cls, path: str | Path, shapes: Optional[Shapes] = None) -> "SparsityPlan":
        """Read and validate a plan file; with ``shapes``, also check it against the model (``resolve``)."""
        path = Path(path)
        if not path.is_file():
            raise PlanError(f"sparsity plan {path} does not exist")
        text = path.read_text()
        try:
            data = json.loads(text) if path.suffix == ".json" else yaml_load(text)
        except (json.JSONDecodeError, yaml.YAMLError) as e:
            raise PlanError(f"{path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {e}") from e
        if not isinstance(data, dict):
            raise PlanError(f"{path}: a plan is a mapping with `default` (and `layers`, `target`)")
        plan = validate_config(cls, data, f"sparsity plan {path}")
        if shapes is not None:
            try:
                plan.resolve(shapes)
            except PlanError as e:
                raise PlanError(f"sparsity plan {path}: {e}") from None
        return plan


@dataclass(frozen=True)
class ResolvedPlan:
    """A plan applied to a model: each pruned linear's level, in the model's layer order."""

    levels: dict[str, SparsityTarget]
    shapes: dict[str, tuple[int, int]]
    target: Optional[float] = None  # the plan's declared average, if it declared one

    @property
    def parameters(self) -> int:
        return sum(o * i for o, i in self.shapes.values())

    @property
    def pruned_weights(self) -> Fraction:
        return sum((level_sparsity(lv) * self.numel(n) for n, lv in self.levels.items()), Fraction(0))

    def numel(self, name: str) -> int:
        out, inp = self.shapes[name]
        return out * inp

    @property
    def average(self) -> Fraction:
        """Parameter-weighted average sparsity, exact."""
        return self.pruned_weights / self.parameters

    @property
    def tolerance(self) -> int:
        """One group of M, in weights (see the module docstring)."""
        return max(group_size(lv) for lv in self.levels.values())

    @property
    def uniform_level(self) -> Optional[SparsityTarget]:
        """The one level of every layer, or None for a mixed plan (uniform plans run as today's runs)."""
        distinct = set(self.levels.values())
        return next(iter(distinct)) if len(distinct) == 1 else None

    def check_average(self, target: float) -> None:
        off = self.pruned_weights - Fraction(str(target)) * self.parameters
        if abs(off) > self.tolerance:
            raise PlanError(
                f"the plan's parameter-weighted average sparsity is {float(self.average):.6f}, not the declared "
                f"target {target}: {float(off):+.1f} pruned weights of {self.parameters}, more than one group "
                f"of M={self.tolerance} weights")

    def listing(self) -> SparsityPlan:
        """The plan with every layer named exactly (a run's ``plan.json``), declaring its declared target
        or, without one, its own average."""
        default = SparsityPlan.from_levels(self.levels).default
        return SparsityPlan(default=default, layers=dict(self.levels),
                            target=float(self.average) if self.target is None else self.target)

    def table(self) -> list[dict[str, Any]]:
        """Rows for reports: name, shape, level and its sparsity."""
        return [{"name": n, "out": self.shapes[n][0], "in": self.shapes[n][1], "level": level_text(lv),
                 "sparsity": float(level_sparsity(lv))} for n, lv in self.levels.items()]
