"""Typed, strict configs: unknown keys, wrong types and impossible values fail at load, naming the field."""

from __future__ import annotations

import re
import typing
from pathlib import Path
from typing import Annotated, Any, Iterable, TypeVar, Union

import yaml
from pydantic import BaseModel, ConfigDict, PlainSerializer, PlainValidator, ValidationError

from compressor.errors import ConfigError
from compressor.sparsity.nm import NM, Unstructured, parse_sparsity


class StrictModel(BaseModel):
    """Base of every config: a misspelt key is an error, and values are never rewritten silently."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


def _serialize_sparsity(value: Union[NM, Unstructured]) -> Any:
    return str(value) if isinstance(value, NM) else value.sparsity


# "2:4" / [2, 4] / {n: 2, m: 4} -> NM;  0.5 -> Unstructured(0.5)
SparsityField = Annotated[
    Union[NM, Unstructured], PlainValidator(parse_sparsity), PlainSerializer(_serialize_sparsity)
]

ConfigT = TypeVar("ConfigT", bound=BaseModel)


class _ReadsPath:
    """Field metadata: the value may name a local path the run reads (so its output must stay apart)."""

    def __repr__(self) -> str:
        return "InputPath"


_INPUT = _ReadsPath()
# A model source, data source, prior or logits path: a local path, or a name that is not one (a hub
# name, "builtin:..."); ``input_paths`` collects them for the output-folder checks.
InputPath = Annotated[str, _INPUT]


def _marks_input(annotation: Any) -> bool:
    if typing.get_origin(annotation) is Annotated:
        return _INPUT in annotation.__metadata__
    return any(_marks_input(arg) for arg in typing.get_args(annotation))


def input_paths(cfg: BaseModel, prefix: str = "") -> dict[str, str]:
    """Every ``InputPath`` value set in ``cfg`` (nested sections too), keyed by its dotted field name."""
    found: dict[str, str] = {}
    for name, info in type(cfg).model_fields.items():
        value = getattr(cfg, name)
        if isinstance(value, BaseModel):
            found.update(input_paths(value, f"{prefix}{name}."))
        elif isinstance(value, str) and (_INPUT in info.metadata or _marks_input(info.annotation)):
            found[f"{prefix}{name}"] = value
    return found


def format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid config ({err.error_count()} problem(s)):"]
    for e in err.errors():
        field = ".".join(str(p) for p in e["loc"]) or "<top level>"
        if e["type"] == "extra_forbidden":
            msg = "unknown key (misspelt? see the config reference in README.md)"
        else:
            msg = e["msg"]
        got = "" if e["type"] in ("missing", "extra_forbidden") else f" (got {e.get('input')!r})"
        lines.append(f"  - field `{field}`: {msg}{got}")
    return "\n".join(lines)


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads ``2:4`` as the base-60 integer 124; here it stays the string "2:4"."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:int"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:int",
    re.compile(r"^(?:[-+]?0b[0-1_]+|[-+]?0[0-7_]+|[-+]?(?:0|[1-9][0-9_]*)|[-+]?0x[0-9a-fA-F_]+)$"),
    list("-+0123456789"),
)


def yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)


def parse_overrides(items: Iterable[str]) -> dict[str, Any]:
    """``["a.b=3", "c=x"]`` -> nested dict; values are parsed as YAML scalars/lists."""
    tree: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.subkey=value")
        key, raw = item.split("=", 1)
        node = tree
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} conflicts with an earlier override of {part!r}")
        node[parts[-1]] = yaml_load(raw)
    return tree


def merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist (give a path to a YAML file, e.g. configs/quickstart.yaml)")
    try:
        data = yaml_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys to values, got {type(data).__name__}")
    return data


def validate_config(cls: type[ConfigT], data: dict[str, Any], source: str = "config") -> ConfigT:
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, source)) from None


def load_config(cls: type[ConfigT], path: str | Path, overrides: Iterable[str] = ()) -> ConfigT:
    """Read ``path`` (YAML), apply ``key=value`` overrides, validate against ``cls``."""
    data = merge(read_yaml(path), parse_overrides(overrides))
    return validate_config(cls, data, str(path))
