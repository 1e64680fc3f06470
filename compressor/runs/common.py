"""Pieces every run shares: output folders, saved configs, windows, evaluation, the final report."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional

import torch
import yaml
from pydantic import BaseModel

from compressor.config.base import yaml_load
from compressor.errors import ConfigError
from compressor.eval.config import EvalConfig
from compressor.eval.perplexity import PerplexityResult, perplexity
from compressor.eval.precision import eval_precision
from compressor.utils.env import environment_info, peak_rss_bytes
from compressor.utils.fs import atomic_write_json, atomic_write_text
from compressor.utils.logging import get_logger
from compressor.utils.timing import PhaseTimer

log = get_logger(__name__)
CONFIG_FILE = "config.yaml"


def config_dict(cfg: BaseModel) -> dict[str, Any]:
    return cfg.model_dump(mode="json")


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict) or not tree:
        return {prefix: tree}
    return {k: v for key, value in tree.items() for k, v in _flat(value, f"{prefix}{key}.").items()}


def config_differences(saved: dict[str, Any], current: dict[str, Any], ignore: tuple[str, ...] = ()) -> list[str]:
    """Dotted keys whose values differ, leaving out the ``ignore`` keys and everything under them."""
    a, b = _flat(saved), _flat(current)
    ignored = lambda key: any(key == i + "." or key.startswith(i + ".") for i in ignore)  # noqa: E731
    return sorted(k.rstrip(".") for k in set(a) | set(b) if not ignored(k) and a.get(k) != b.get(k))


def save_or_check_config(out: Path, cfg: BaseModel, resuming: bool, ignore: tuple[str, ...] = ("executor",),
                         may_change: str = "the executor") -> None:
    """Record the config; when resuming, refuse a config that would change the result.

    ``ignore``: dotted keys (sections or single values, e.g. ``train.steps``) a resumed run may change,
    described to the user as ``may_change``.
    """
    path = out / CONFIG_FILE
    current = config_dict(cfg)
    if resuming and path.is_file():
        diff = config_differences(yaml_load(path.read_text()) or {}, current, ignore)
        if diff:
            raise ConfigError(
                f"cannot resume {out}: the config differs from the saved run's in {', '.join(diff)} (only "
                f"{may_change} may change); use the same config (see its config.yaml), or pass --overwrite "
                "(or another --output) to start over"
            )
    atomic_write_text(path, yaml.safe_dump(current, sort_keys=False))


def eval_windows_for(cfg: EvalConfig, tokenizer) -> tuple[torch.Tensor, Optional[str]]:
    from compressor.data import eval_windows, load_token_ids

    tokens = load_token_ids(cfg.data, tokenizer)
    windows = eval_windows(tokens, cfg.seq_len, cfg.max_windows)
    note = f"quick variant: first {windows.shape[0]} windows" if cfg.max_windows else None
    return windows, note


def evaluate(model, windows: torch.Tensor, cfg: EvalConfig, note: Optional[str], desc: str) -> PerplexityResult:
    with eval_precision(model, cfg.dtype) as evaluated:
        result = perplexity(evaluated, windows, cfg.batch_size, desc=desc, note=note)
    log.info("%s perplexity %.3f over %d windows%s", desc, result.perplexity, result.windows, f" ({note})" if note else "")
    return result


def memory_record(timer: Optional[PhaseTimer] = None) -> dict[str, Any]:
    """report.json's ``memory``: this process's peak RSS and, where measured, ``timer``'s peak per phase."""
    record: dict[str, Any] = {"peak_rss_bytes": peak_rss_bytes()}
    if timer is not None and timer.peak_rss_by_phase():
        record["peak_rss_bytes_by_phase"] = timer.peak_rss_by_phase()
        record["accounting_seconds"] = round(timer.accounting_seconds, 3)  # what measuring those peaks cost
        record["accounting_boundaries"], record["accounting_trims"] = timer.boundaries, timer.trims
    return record


def finish_report(out: Path, report: dict[str, Any], markdown: Optional[Callable[[dict], str]] = None,
                  timer: Optional[PhaseTimer] = None) -> dict[str, Any]:
    """Add environment and memory (this process's peak, and per phase of ``timer``), write report.md, and
    report.json last: it marks a finished run."""
    report.setdefault("memory", {}).update(memory_record(timer))
    report["environment"] = environment_info()
    if markdown is not None:
        atomic_write_text(out / "report.md", markdown(report))
    atomic_write_json(out / "report.json", report)
    return report
