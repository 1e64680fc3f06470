"""The Ray worker group: placement, torch.distributed environment, restarts after a failed rank."""

from __future__ import annotations

import pytest

from compressor.errors import ConfigError
from compressor.parallel.ray_config import RayWorkersConfig
from compressor.parallel.ray_driver import PlacementError, WorkerGroup, WorkerGroupError, run_worker_group
from tests.parallel import ray_entries

CFG = RayWorkersConfig(num_cpus=2, cpus_per_worker=1, max_restarts=1, start_timeout_s=60,
                       env={"COMPRESSOR_TEST_VAR": "set by ray.env"})


@pytest.fixture(scope="module")
def ray_local():
    """One small local cluster for the module; the driver reuses a running Ray and leaves it up."""
    ray = pytest.importorskip("ray")
    from compressor.parallel.ray_driver import ray_cluster

    with ray_cluster(CFG) as started:
        assert started
        yield ray


def test_environments_local_rank_and_gpus():
    """Pure logic: LOCAL_RANK counts ranks per node; on GPUs it indexes the node's GPU list."""
    group = WorkerGroup(4, RayWorkersConfig(cpus_per_worker=2, gpus_per_worker=1))
    group.master_addr, group.master_port = "10.0.0.1", 29500
    nodes = [("10.0.0.1", "a", ["1"]), ("10.0.0.2", "b", ["0"]), ("10.0.0.1", "a", ["0"]), ("10.0.0.2", "b", ["1"])]
    envs = group._environments(nodes)
    assert [e["RANK"] for e in envs] == ["0", "1", "2", "3"]
    assert [e["LOCAL_RANK"] for e in envs] == ["1", "0", "0", "1"]
    assert {e["CUDA_VISIBLE_DEVICES"] for e in envs} == {"0,1"}
    assert {(e["MASTER_ADDR"], e["MASTER_PORT"], e["WORLD_SIZE"], e["OMP_NUM_THREADS"]) for e in envs} == {
        ("10.0.0.1", "29500", "4", "2")}
    cpu_envs = WorkerGroup(3, RayWorkersConfig())._environments([("h", "a", []), ("h", "a", []), ("g", "b", [])])
    assert [e["LOCAL_RANK"] for e in cpu_envs] == ["0", "1", "0"]
    assert all("CUDA_VISIBLE_DEVICES" not in e for e in cpu_envs)


@pytest.mark.ray
def test_two_ranks_get_their_environment_and_all_reduce(ray_local):
    out = run_worker_group(ray_entries.report_environment, world_size=2, cfg=CFG)
    assert out["sum"] == 3.0  # (0 + 1) + (1 + 1) through a gloo all-reduce
    envs = out["envs"]
    assert [e["RANK"] for e in envs] == ["0", "1"]
    assert {e["WORLD_SIZE"] for e in envs} == {"2"}
    assert [e["LOCAL_RANK"] for e in envs] == ["0", "1"]  # one node
    assert len({(e["MASTER_ADDR"], e["MASTER_PORT"]) for e in envs}) == 1
    assert len({e["pid"] for e in envs}) == 2  # one process per rank
    assert {e["threads"] for e in envs} == {1}  # = cpus_per_worker
    assert {e["COMPRESSOR_TEST_VAR"] for e in envs} == {"set by ray.env"}


@pytest.mark.ray
def test_killed_rank_restarts_group_and_resumes(ray_local, tmp_path, caplog):
    steps = 6
    clean = tmp_path / "clean"
    crashed = tmp_path / "crashed"
    clean.mkdir(), crashed.mkdir()
    expected = run_worker_group(ray_entries.count_steps, (str(clean), steps), world_size=2, cfg=CFG)
    assert expected == {"step": steps, "total": 3.0 * sum(range(1, steps + 1))}

    with caplog.at_level("WARNING", logger="compressor"):
        got = run_worker_group(ray_entries.count_steps, (str(crashed), steps, 1, 2, 1), world_size=2, cfg=CFG)
    assert got == expected
    starts = [int(s) for s in (crashed / "starts.txt").read_text().split()]
    assert starts[0] == 0 and len(starts) == 2 and starts[1] >= 2  # the second attempt resumed, not restarted
    assert (crashed / "crash-0").exists()
    assert "rank 1: its worker process died" in caplog.text and "restarting all 2 ranks" in caplog.text


@pytest.mark.ray
def test_exhausted_restarts_name_the_failing_rank(ray_local, tmp_path):
    with pytest.raises(WorkerGroupError) as err:
        run_worker_group(ray_entries.fail_on_rank, (str(tmp_path), 1, "runtime"), world_size=2, cfg=CFG)
    assert err.value.rank == 1 and isinstance(err.value.cause, RuntimeError)
    assert "attempt 2 of 2" in str(err.value) and "rank 1: RuntimeError: rank 1 broke on purpose" in str(err.value)
    assert (tmp_path / "attempts.txt").read_text().count("x") == 2  # max_restarts=1: two attempts


@pytest.mark.ray
def test_user_error_is_not_retried(ray_local, tmp_path):
    with pytest.raises(ConfigError, match="train.steps must be positive"):
        run_worker_group(ray_entries.fail_on_rank, (str(tmp_path), 0, "config"), world_size=2, cfg=CFG)
    assert (tmp_path / "attempts.txt").read_text().count("x") == 1


@pytest.mark.ray
def test_unplaceable_group_says_what_was_asked_and_what_exists(ray_local):
    greedy = CFG.model_copy(update={"cpus_per_worker": 2.0, "start_timeout_s": 1.0})
    with pytest.raises(PlacementError) as err:
        run_worker_group(ray_entries.report_environment, world_size=2, cfg=greedy)
    msg = str(err.value)
    assert "2 workers of 2 CPU each" in msg and "2 CPU" in msg and "ray.cpus_per_worker" in msg


def test_ranks_are_numbered_node_by_node():
    """Tensor-parallel groups are consecutive ranks, so each node's bundles get consecutive ranks."""
    from compressor.parallel.ray_driver import node_contiguous_order

    assert node_contiguous_order(["a", "b", "a", "b", "c", "a"]) == [0, 2, 5, 1, 3, 4]
    assert node_contiguous_order(["a", "a"]) == [0, 1]


@pytest.mark.ray
def test_too_big_for_a_local_cluster_fails_without_waiting(ray_local):
    import time

    group = WorkerGroup(3, CFG.model_copy(update={"start_timeout_s": 300.0}), fixed_cluster=True)
    t0 = time.monotonic()
    with pytest.raises(PlacementError, match=r"could not place 3 workers of 1 CPU each \(strategy PACK\); "
                                             r"the cluster has 2 CPU"):
        group.start()
    assert time.monotonic() - t0 < 10
    group.shutdown()
