"""Aggregates of per-layer reports (means overall and per layer type)."""

from __future__ import annotations

from collections import defaultdict
from statistics import mean
from typing import Any, Iterable, Mapping, Optional


def mean_by_type(layers: Iterable[Mapping[str, Any]], key: str) -> dict[str, float]:
    groups: dict[str, list[float]] = defaultdict(list)
    for row in layers:
        if row.get(key) is not None:
            groups[row["type"]].append(row[key])
    return {t: mean(v) for t, v in groups.items()}


def mean_of(layers: Iterable[Mapping[str, Any]], key: str) -> Optional[float]:
    values = [row[key] for row in layers if row.get(key) is not None]
    return mean(values) if values else None


def weighted_density(layers: Iterable[Mapping[str, Any]]) -> float:
    kept = total = 0.0
    for row in layers:
        size = row["shape"][0] * row["shape"][1]
        kept += row["density"] * size
        total += size
    return kept / total if total else 1.0
