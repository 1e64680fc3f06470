"""`compressor prune` with its Ray tasks spread over a two-node cluster simulated on this machine."""

from __future__ import annotations

import pytest
import torch

from compressor.checkpoints.masks import load_masks


def _prune(tiny_llama_dir, text_file, out, executor: dict) -> dict:
    from compressor.runs.prune import PruneConfig, run_prune

    cfg = PruneConfig.model_validate({
        "model": {"source": str(tiny_llama_dir)}, "sparsity": "2:4", "method": "sparsegpt",
        "calibration": {"data": {"source": str(text_file)}, "num_windows": 8, "seq_len": 64, "batch_size": 4},
        "evaluation": {"enabled": False}, "save_model": False, "executor": executor,
    })
    return run_prune(cfg, out)


def _warm_workers(cluster) -> None:
    """Start this driver's worker processes on every node first (the executor then joins this connection).

    Otherwise the executor's own warm-up tasks hold the small node's one CPU while its worker imports torch
    (seconds), and SPREAD, which only picks nodes with free CPUs, sends a tiny run's few jobs elsewhere."""
    import ray

    from compressor.execution.local_cluster import node_resource
    from compressor.execution.ray_executor import _warm_up

    ray.init(address=cluster.address, log_to_driver=False)
    warm = ray.remote(num_cpus=1)(_warm_up)
    ray.get([warm.options(resources={node_resource(i): 0.01}).remote()
             for i, cpus in enumerate(cluster.node_cpus) for _ in range(cpus)])


@pytest.mark.ray
def test_prune_tasks_run_on_both_nodes_with_the_in_process_result(two_nodes, tiny_llama_dir, text_file, tmp_path):
    _warm_workers(two_nodes)
    spread = _prune(tiny_llama_dir, text_file, tmp_path / "ray",
                    {"kind": "ray", "address": two_nodes.address, "scheduling": "SPREAD"})
    counts = spread["executor"]["tasks_per_node"]
    assert set(counts) == set(two_nodes.node_ids), counts
    assert spread["executor"]["nodes"] == 2 and min(counts.values()) >= 1

    local = _prune(tiny_llama_dir, text_file, tmp_path / "local", {"kind": "inprocess"})
    assert local["executor"] == {"kind": "inprocess"}
    a, b = load_masks(tmp_path / "ray" / "masks.safetensors"), load_masks(tmp_path / "local" / "masks.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
