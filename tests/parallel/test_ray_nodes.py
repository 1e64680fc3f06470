"""`compressor launch` on a two-node Ray cluster simulated on this machine (tests/conftest.py `two_nodes`):
placement strategies across nodes, and a node lost mid-run, resumed on what remains."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("megatron.core")
ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs" / "distributed" / "tiny_tp2.yaml"


def _sets(tiny_llama_dir: Path, wikitext_dir: Path, address: str, steps: int, strategy: str) -> list[str]:
    # TP=1 x DP=2: two ranks that exchange only the logits' gradients
    return [f"model.source={tiny_llama_dir}", f"train.data.source={wikitext_dir / 'wiki.valid.tokens'}",
            f"train.steps={steps}", "train.seq_len=64", "train.micro_batch_size=2", "train.log_every=1",
            "train.checkpoint_every=2", "evaluation.enabled=false", "parallel.tensor=1", "parallel.data=2",
            f"ray.address={address}", f"ray.placement_strategy={strategy}", "ray.max_restarts=0",
            "ray.start_timeout_s=60"]


def _launch(sets: list[str], output: Path, resume: bool = False) -> dict:
    from compressor.config.base import load_config
    from compressor.launch import launch
    from compressor.parallel.config import DistributedLearnConfig

    return launch(load_config(DistributedLearnConfig, CONFIG, sets), output, resume=resume)


@pytest.mark.ray
@pytest.mark.distributed
def test_strategy_places_ranks_across_or_on_one_node(two_nodes, tiny_llama_dir, wikitext_dir, tmp_path):
    head, other = two_nodes.node_ids
    spread = _launch(_sets(tiny_llama_dir, wikitext_dir, two_nodes.address, 1, "STRICT_SPREAD"), tmp_path / "spread")
    assert sorted(spread["parallel"]["nodes"]) == sorted([head, other])
    packed = _launch(_sets(tiny_llama_dir, wikitext_dir, two_nodes.address, 1, "STRICT_PACK"), tmp_path / "pack")
    assert packed["parallel"]["nodes"] == [head, head]  # STRICT_PACK: one node (PACK is best effort and may spread while the last group's CPUs are released)


@pytest.mark.ray
@pytest.mark.distributed
def test_lost_node_then_resume_on_the_head_gives_the_same_masks(two_nodes, tiny_llama_dir, wikitext_dir, tmp_path):
    from safetensors.torch import load_file

    from compressor.parallel.megatron_checkpoint import step_name

    steps = 10
    spread = _sets(tiny_llama_dir, wikitext_dir, two_nodes.address, steps, "STRICT_SPREAD")
    clean = _launch(spread, tmp_path / "clean")  # the uninterrupted reference, across both nodes
    assert len(set(clean["parallel"]["nodes"])) == 2

    # One restart allowed: it cannot place STRICT_SPREAD on the one node left, so it fails after its timeout.
    out = tmp_path / "killed"
    sets = [*spread, "ray.max_restarts=1", "ray.start_timeout_s=10"]
    args = ["-m", "compressor.launch", str(CONFIG), "--output", str(out), *[a for s in sets for a in ("--set", s)]]
    with open(tmp_path / "killed.log", "w") as log:
        run = subprocess.Popen([sys.executable, *args], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        first = out / "checkpoints" / step_name(2)
        deadline = time.monotonic() + 180
        while not first.exists() and run.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert first.exists(), (tmp_path / "killed.log").read_text()[-3000:]
        two_nodes.kill_node(1)  # raylet, its workers (rank 1) and agents at once
        code = run.wait(120)
    finally:
        if run.poll() is None:
            run.kill()
    text = (tmp_path / "killed.log").read_text()
    assert code == 2, f"the run was meant to fail after the node was lost (exit {code}):\n{text[-3000:]}"
    died = re.search(r"attempt 1 of 2 failed: rank (\d): its worker process died", text)
    assert died, text[-3000:]
    assert f"node {two_nodes.node_ids[1]} (ranks [{died.group(1)}]) left the cluster" in text, text[-3000:]
    assert "could not place 2 workers of 1 CPU each (strategy STRICT_SPREAD) within ray.start_timeout_s=10" in text
    assert not (out / "logits.safetensors").exists()

    # What remains: the head alone (2 CPUs); STRICT_SPREAD could no longer be placed, PACK can.
    packed = [s for s in spread if not s.startswith("ray.placement_strategy")] + ["ray.placement_strategy=PACK"]
    resumed = _launch(packed, out, resume=True)
    assert resumed["parallel"]["nodes"] == [two_nodes.node_ids[0]] * 2
    assert [r["loss"] for r in resumed["history"]["logs"]] == [r["loss"] for r in clean["history"]["logs"]]
    a, b = load_file(tmp_path / "clean" / "logits.safetensors"), load_file(out / "logits.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    m, n = load_file(tmp_path / "clean" / "masks.safetensors"), load_file(out / "masks.safetensors")
    assert all(torch.equal(m[k], n[k]) for k in m)
