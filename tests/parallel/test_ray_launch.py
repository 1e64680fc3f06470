"""`compressor launch` / compressor.launch: real megatron ranks (TP=2, tiny LLaMA) under the Ray driver."""

from __future__ import annotations

import json
import logging
from functools import partial
from pathlib import Path

import pytest
import torch

from tests.parallel import ray_entries

pytest.importorskip("megatron.core")
ROOT = Path(__file__).resolve().parents[2]
STEPS = 6


@pytest.fixture(scope="module")
def ray_local():
    from compressor.parallel.ray_config import RayWorkersConfig
    from compressor.parallel.ray_driver import ray_cluster

    with ray_cluster(RayWorkersConfig(num_cpus=2)):
        yield


def overrides(tiny_llama_dir: Path, wikitext_dir: Path) -> list[str]:
    return [f"model.source={tiny_llama_dir}", f"train.data.source={wikitext_dir / 'wiki.valid.tokens'}",
            f"train.steps={STEPS}", "train.seq_len=64", "train.micro_batch_size=2", "train.log_every=1",
            "train.checkpoint_every=2", "evaluation.enabled=false"]


@pytest.mark.ray
@pytest.mark.distributed
def test_killed_rank_resumes_to_the_same_masks(ray_local, tiny_llama_dir, wikitext_dir, tmp_path, caplog):
    from safetensors.torch import load_file

    from compressor.cli import main
    from compressor.config.base import load_config
    from compressor.launch import launch
    from compressor.parallel.config import DistributedLearnConfig

    config = ROOT / "configs" / "distributed" / "tiny_tp2.yaml"
    sets = overrides(tiny_llama_dir, wikitext_dir)
    clean = tmp_path / "clean"
    args = ["launch", "--config", str(config), "--output", str(clean)]
    assert main(args + [a for s in sets for a in ("--set", s)]) == 0  # the CLI, uninterrupted
    report = json.loads((clean / "report.json").read_text())
    assert report["parallel"]["tensor"] == 2 and len(report["history"]["logs"]) == STEPS

    cfg = load_config(DistributedLearnConfig, config, sets)
    killed, marker = tmp_path / "killed", tmp_path / "killed-once"
    entry = partial(ray_entries.train_rank_killed_once, kill_rank=1, after_step=2, marker=str(marker))
    package_log = logging.getLogger("compressor")  # main() set it up not to propagate: listen on it directly
    package_log.addHandler(caplog.handler)
    try:
        got = launch(cfg, killed, entry=entry)
    finally:
        package_log.removeHandler(caplog.handler)
    assert marker.exists(), "rank 1 was never killed: the test proved nothing"
    assert "rank 1: its worker process died" in caplog.text and "attempt 1 of 3 failed" in caplog.text
    starts = Path(f"{marker}.starts").read_text().split()
    assert starts[0] == "none" and len(starts) == 2 and starts[1] != "none"  # the restart resumed
    assert [r["loss"] for r in got["history"]["logs"]] == [r["loss"] for r in report["history"]["logs"]]
    a, b = load_file(clean / "logits.safetensors"), load_file(killed / "logits.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
