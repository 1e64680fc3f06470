"""Distributed mask learning: one Ray actor per megatron-core rank (TP x PP x DP), restarted on failure.

    python -m compressor.launch CONFIG --output DIR [--set key=value ...] [--ray-address ADDR] [--resume]
    ray job submit --working-dir . -- python -m compressor.launch CONFIG --output /shared/runs/x

Every rank reads and writes ``--output``, so on a cluster it must be on a filesystem all nodes share
(and absolute under ``ray job submit``, whose working directory is a temporary copy).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence

from compressor.errors import CompressorError
from compressor.utils.logging import get_logger, setup_logging

if TYPE_CHECKING:
    from compressor.parallel.config import DistributedLearnConfig

log = get_logger(__name__)


def add_launch_arguments(p: argparse.ArgumentParser, config_flag: bool = False) -> None:
    """The launch options; ``config_flag`` spells the config ``--config`` (as the `compressor` CLI does)."""
    if config_flag:
        p.add_argument("--config", required=True, help="YAML config (see configs/distributed/)")
    else:
        p.add_argument("config", help="YAML config (see configs/distributed/)")
    p.add_argument("--output", required=True,
                   help="run folder; on a cluster a path every node can reach (shared filesystem)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set parallel.tensor=2 --set train.steps=20")
    p.add_argument("--ray-address", help="join this Ray cluster (sets ray.address; default: $RAY_ADDRESS, "
                   "else start a local cluster)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--resume", action="store_true", help="continue an interrupted run in --output")
    g.add_argument("--overwrite", action="store_true", help="replace an existing output folder")


def launch(cfg: "DistributedLearnConfig", output: str | Path, overwrite: bool = False, resume: bool = False,
           entry: Optional[Callable[..., Any]] = None) -> Optional[dict[str, Any]]:
    """Run ``entry(cfg, output)`` (default: megatron ``train_rank``) on every rank; rank 0's report.

    The output folder is checked once here, before any rank starts; restarts after a failure then resume
    from the checkpoints in it without asking again. ``resume`` also continues a finished run given more
    ``train.steps`` (``train_rank`` checks that the rest of the config matches the saved one).
    """
    from compressor.config.base import input_paths
    from compressor.parallel.ray_driver import run_worker_group
    from compressor.utils.run_folder import run_folder

    if entry is None:
        from compressor.parallel.megatron_train import train_rank

        entry = train_rank
    p = cfg.parallel
    out = Path(output).resolve()
    with run_folder(out, "launch", input_paths(cfg), overwrite, resume, resume_finished=True):
        log.info("launch: %d ranks (TP=%d PP=%d DP=%d), output %s", p.world_size, p.tensor, p.pipeline, p.data, out)
        return run_worker_group(entry, (cfg, str(out)), world_size=p.world_size, cfg=cfg.ray)


def run_from_args(args: argparse.Namespace) -> int:
    """Load the config named by parsed arguments and launch it; the exit code."""
    from compressor.config.base import load_config
    from compressor.parallel.config import DistributedLearnConfig
    from compressor.parallel.ray_driver import WorkerGroupError

    overrides = list(args.overrides)
    if args.ray_address:
        overrides.append(f"ray.address={args.ray_address}")
    try:
        cfg = load_config(DistributedLearnConfig, args.config, overrides)
        summary = launch(cfg, args.output, overwrite=args.overwrite, resume=args.resume)
    except CompressorError as e:
        log.error("%s", e)
        return 2
    except WorkerGroupError as e:
        log.error("%s", e)
        return 1
    if summary is not None:
        print(_one_line(summary))
    return 0


def _one_line(report: dict[str, Any]) -> str:
    p, logs = report.get("parallel", {}), report.get("history", {}).get("logs", [])
    ppl = report.get("perplexity")
    parts = [f"maskllm {report.get('sparsity')} on {p.get('world_size')} ranks (TP={p.get('tensor')} "
             f"PP={p.get('pipeline')} DP={p.get('data')})"]
    if p.get("nodes"):
        parts.append(f"{len(set(p['nodes']))} node(s)")
    parts.append(f"{len(logs)} log points")
    if logs and "loss" in logs[-1]:
        parts.append(f"last loss {logs[-1]['loss']:.4f}")
    if isinstance(ppl, dict) and "perplexity" in ppl:
        parts.append(f"hard-mask perplexity {ppl['perplexity']:.3f}")
    return ", ".join(parts)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m compressor.launch", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_launch_arguments(parser)
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    setup_logging(args.log_level)
    return run_from_args(args)


if __name__ == "__main__":
    sys.exit(main())
