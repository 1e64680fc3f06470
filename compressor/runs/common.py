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

log = get_logger(__name__)
CONFIG_FILE = "config.yaml"


def config_dict(cfg: BaseModel) -> dict[str, Any]:
    return cfg.model_dump(mode="json")


def save_or_check_config(out: Path, cfg: BaseModel, resuming: bool, ignore: tuple[str, ...] = ("executor",)) -> None:
    """Record the config; when resuming, refuse a config that would change the result."""
    path = out / CONFIG_FILE
    current = config_dict(cfg)
    if resuming and path.is_file():
        saved = yaml_load(path.read_text()) or {}
        diff = sorted(k for k in set(saved) | set(current) if k not in ignore and saved.get(k) != current.get(k))
        if diff:
            raise ConfigError(
                f"cannot resume {out}: the config differs from the interrupted run's in {', '.join(diff)}; "
                "use the same config (see its config.yaml) or pass --overwrite to start over"
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


def finish_report(out: Path, report: dict[str, Any], markdown: Optional[Callable[[dict], str]] = None) -> dict[str, Any]:
    """Add environment and memory, write report.md, and report.json last: it marks a finished run."""
    report.setdefault("memory", {})["peak_rss_bytes"] = peak_rss_bytes()
    report["environment"] = environment_info()
    if markdown is not None:
        atomic_write_text(out / "report.md", markdown(report))
    atomic_write_json(out / "report.json", report)
    return report
