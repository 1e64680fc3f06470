"""Run one process per rank of a torch.distributed job as Ray actors; restart the whole group on failure.

A *worker group* reserves a placement group (one bundle per rank), starts one actor per bundle, sets
RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT in each, and runs a per-rank entry
``fn(*args)`` on all of them. The entry initialises torch.distributed itself and resumes from its own
checkpoint, so a failed group is simply torn down and started again (``run_worker_group``).

Ray is imported inside functions: importing this module does not need Ray.
"""

from __future__ import annotations

import os
import socket
import time
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Callable, Iterator, Optional, Sequence, TypeVar

from compressor.errors import CompressorError
from compressor.parallel.ray_config import RayWorkersConfig
from compressor.utils.logging import get_logger

log = get_logger(__name__)

T = TypeVar("T")

# After the first rank fails, wait this long for the others: when a process dies, its peers fail in
# their next collective a moment later, and the report should name the rank that died, not its peers.
FAILURE_GRACE_S = 5.0
# When a worker process died, wait up to this long for the cluster to declare its node dead, so that the
# error says a node was lost: the health check declares it seconds after its workers are seen gone.
NODE_DEATH_WAIT_S = 5.0
# Each rank's Ray node id, set in its environment (several nodes may share one IP address and host name).
NODE_ID_ENV = "COMPRESSOR_NODE_ID"


class PlacementError(CompressorError):
    """The cluster cannot hold the requested workers (or they did not start) within the time limit."""


class WorkerGroupError(RuntimeError):
    """A rank failed on the last allowed attempt; ``rank`` and ``cause`` say which and why."""

    def __init__(self, message: str, rank: int, cause: BaseException) -> None:
        super().__init__(message)
        self.rank = rank
        self.cause = cause


@dataclass(frozen=True)
class RankFailure:
    rank: int
    error: BaseException  # the entry's own exception, or Ray's error when the process died
    died: bool  # the process (actor) died, as opposed to the entry raising

    def describe(self) -> str:
        if self.died:
            first_line = str(self.error).strip().splitlines()[0] if str(self.error).strip() else ""
            return f"rank {self.rank}: its worker process died ({type(self.error).__name__}: {first_line[:300]})"
        return f"rank {self.rank}: {type(self.error).__name__}: {str(self.error)[:500]}"


class GroupFailed(Exception):
    """One attempt of a group failed; ``root`` is the failure most likely to be the cause."""

    def __init__(self, failures: Sequence[RankFailure]) -> None:
        # A dead process explains the errors of its peers (broken collectives), not the other way round;
        # otherwise the first failure to arrive is the cause (the sort is stable).
        self.failures = sorted(failures, key=lambda f: not f.died)
        self.root = self.failures[0]
        others = "; ".join(f.describe() for f in self.failures[1:])
        super().__init__(self.root.describe() + (f" (then {others})" if others else ""))


# ---------------------------------------------------------------------------------------------------
# The cluster


@contextmanager
def ray_cluster(cfg: RayWorkersConfig) -> Iterator[bool]:
    """Join ``cfg.address`` (or ``$RAY_ADDRESS``, set inside ``ray job submit``), else start a local cluster.

    Yields whether this call started the cluster; only such a cluster is shut down at the end. Without an
    address we deliberately start a *new* cluster (address="local") rather than let Ray pick up whatever
    ``ray start`` ran last on this machine: use ``address: auto`` to join that one.
    """
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if ray.is_initialized():
        yield False
        return
    address = cfg.address or os.environ.get("RAY_ADDRESS") or None
    t0 = time.monotonic()
    if address:
        ray.init(address=address, log_to_driver=True)
        log.info("ray: joined the cluster at %s in %.1f s: %s", address, time.monotonic() - t0,
                 _format_resources(ray.cluster_resources()))
    else:
        ray.init(address="local", num_cpus=cfg.num_cpus or os.cpu_count(), include_dashboard=False,
                 object_store_memory=cfg.object_store_mb * 1024 * 1024, log_to_driver=True)
        log.info("ray: started a local cluster in %.1f s: %s", time.monotonic() - t0,
                 _format_resources(ray.cluster_resources()))
    try:
        yield address is None
    finally:
        if address is None and ray.is_initialized():
            ray.shutdown()


def _format_resources(resources: dict[str, float]) -> str:
    keys = [k for k in ("CPU", "GPU", "memory") if k in resources]
    parts = [f"{resources[k] / 2**30:.1f} GiB memory" if k == "memory" else f"{resources[k]:g} {k}" for k in keys]
    nodes = sum(1 for k in resources if k.startswith("node:") and not k.startswith("node:__internal"))
    return ", ".join(parts + [f"{nodes} node(s)"])


# ---------------------------------------------------------------------------------------------------
# One actor per rank


class RankProcess:
    """The Ray actor behind one rank. Each actor is its own process, so its environment is its own."""

    def node(self) -> tuple[str, str, list[str]]:
        import ray

        ctx = ray.get_runtime_context()
        return ray.util.get_node_ip_address(), ctx.get_node_id(), [str(g) for g in ray.get_gpu_ids()]

    def free_port(self) -> int:
        # Another process may take the port before rank 0 binds it; rare, and a restart recovers.
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("", 0))
            return int(s.getsockname()[1])

    def setup(self, env: dict[str, str], threads: int) -> int:
        os.environ.update(env)
        import torch

        torch.set_num_threads(threads)
        return os.getpid()

    def run(self, fn: Callable[..., Any], args: tuple) -> Any:
        return fn(*args)


@lru_cache(maxsize=None)
def _actor_class() -> Any:
    import ray

    return ray.remote(RankProcess)


def _ray_errors() -> tuple[type[BaseException], type[BaseException]]:
    from ray.exceptions import RayActorError, RayTaskError, WorkerCrashedError

    return RayTaskError, (RayActorError, WorkerCrashedError)  # type: ignore[return-value]


def wait_all(refs: Sequence[Any], timeout_s: Optional[float] = None) -> list[Any]:
    """Results of one call per rank, in rank order; raises GroupFailed as soon as any rank fails.

    ``timeout_s`` bounds the whole wait (start-up calls); a timeout raises TimeoutError.
    """
    import ray

    task_error, death_errors = _ray_errors()
    pending = {ref: rank for rank, ref in enumerate(refs)}
    results: list[Any] = [None] * len(refs)
    failures: list[RankFailure] = []
    deadline = None if timeout_s is None else time.monotonic() + timeout_s

    def collect(done: Sequence[Any]) -> None:
        for ref in done:
            rank = pending.pop(ref)
            try:
                results[rank] = ray.get(ref)
            except task_error as e:  # the entry raised: keep its own exception
                cause = getattr(e, "cause", None)
                failures.append(RankFailure(rank, cause if isinstance(cause, BaseException) else e, died=False))
            except death_errors as e:
                failures.append(RankFailure(rank, e, died=True))

    while pending and not failures:
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        done, _ = ray.wait(list(pending), num_returns=1, timeout=left)
        if not done:
            raise TimeoutError(f"ranks {sorted(pending.values())} did not answer within {timeout_s:g} s")
        collect(done)
    if failures:
        if pending:
            done, _ = ray.wait(list(pending), num_returns=len(pending), timeout=FAILURE_GRACE_S)
            collect(done)
        raise GroupFailed(failures)
    return results


def node_contiguous_order(node_ids: Sequence[str]) -> list[int]:
    """Bundle indices reordered so that each node's ranks are consecutive (nodes in order of first appearance).

    Megatron puts tensor-parallel groups on consecutive ranks; a placement group does not promise that
    bundles 0..7 share a node, so ranks are numbered node by node instead of by bundle.
    """
    first_seen: dict[str, int] = {}
    for node_id in node_ids:
        first_seen.setdefault(node_id, len(first_seen))
    return sorted(range(len(node_ids)), key=lambda i: (first_seen[node_ids[i]], i))


class WorkerGroup:
    """``world_size`` actors in one placement group, with the torch.distributed environment set.

    Use ``start()``, ``run(fn, *args)`` (any number of times), ``shutdown()``; or ``run_worker_group``,
    which adds the restarts.
    """

    def __init__(self, world_size: int, cfg: RayWorkersConfig, fixed_cluster: bool = False) -> None:
        """``fixed_cluster``: the cluster cannot grow (a local one), so a request larger than it fails at once."""
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        self.world_size = world_size
        self.cfg = cfg
        self.fixed_cluster = fixed_cluster
        self.actors: list[Any] = []
        self.placement_group: Any = None
        self.pids: list[int] = []
        self.master_addr = ""
        self.master_port = 0
        self.startup_seconds = 0.0
        self.node_ids: list[str] = []  # rank -> Ray node id

    def bundle(self) -> dict[str, float]:
        b = {"CPU": float(self.cfg.cpus_per_worker)}
        if self.cfg.gpus_per_worker:
            b["GPU"] = float(self.cfg.gpus_per_worker)
        return b

    def _bundle_text(self) -> str:
        return " + ".join(f"{amount:g} {kind}" for kind, amount in self.bundle().items())

    def start(self) -> None:
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        t0 = time.monotonic()
        self._reserve()
        placed = time.monotonic()
        cls = _actor_class()
        self.actors = [
            cls.options(
                num_cpus=self.cfg.cpus_per_worker,
                num_gpus=self.cfg.gpus_per_worker,
                max_restarts=0,  # we restart the whole group: a lone new rank could not rejoin the collectives
                max_task_retries=0,
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    placement_group=self.placement_group, placement_group_bundle_index=bundle
                ),
            ).remote()
            for bundle in range(self.world_size)
        ]
        try:
            nodes = wait_all([a.node.remote() for a in self.actors], self.cfg.start_timeout_s)
            order = node_contiguous_order([node_id for _, node_id, _ in nodes])
            self.actors, nodes = [self.actors[i] for i in order], [nodes[i] for i in order]
            self.node_ids = [node_id for _, node_id, _ in nodes]
            self.master_addr = nodes[0][0]
            self.master_port = self.cfg.master_port or ray.get(self.actors[0].free_port.remote())
            envs = self._environments(nodes)
            threads = max(1, int(self.cfg.cpus_per_worker))
            self.pids = wait_all([a.setup.remote(env, threads) for a, env in zip(self.actors, envs)],
                                 self.cfg.start_timeout_s)
        except TimeoutError as e:
            raise PlacementError(
                f"the {self.world_size} worker processes did not start within ray.start_timeout_s="
                f"{self.cfg.start_timeout_s:g} s ({e}); check the Ray logs of the nodes "
                "(e.g. /tmp/ray/session_latest/logs)"
            ) from None
        self.startup_seconds = time.monotonic() - t0
        log.info("worker group: %d ranks ready in %.1f s (placement %.1f s, strategy %s), master %s:%d, pids %s, "
                 "ranks per node %s", self.world_size, self.startup_seconds, placed - t0, self.cfg.placement_strategy,
                 self.master_addr, self.master_port, self.pids, self.ranks_per_node())

    def ranks_per_node(self) -> dict[str, list[int]]:
        by_node: dict[str, list[int]] = {}
        for rank, node_id in enumerate(self.node_ids):
            by_node.setdefault(node_id, []).append(rank)
        return by_node

    def lost_nodes_text(self, wait_s: float = 0.0) -> str:
        """Which of the group's nodes the cluster has declared dead, as text for an error ('' if none).
        ``wait_s``: how long to wait for a declaration when a worker process died, since a node's
        health check declares it dead seconds after its workers are seen gone."""
        import ray

        deadline = time.monotonic() + wait_s
        while True:
            try:
                dead = {n["NodeID"] for n in ray.nodes() if not n["Alive"]}
            except Exception as e:  # the error being reported matters more than this note
                log.debug("ray.nodes: %s", e)
                return ""
            lost = {node: ranks for node, ranks in self.ranks_per_node().items() if node in dead}
            if lost or time.monotonic() >= deadline:
                return "".join(f"; node {node} (ranks {ranks}) left the cluster" for node, ranks in lost.items())
            time.sleep(0.25)

    def _reserve(self) -> None:
        import ray
        from ray.util import placement_group, remove_placement_group

        bundles = [self.bundle() for _ in range(self.world_size)]
        total = ray.cluster_resources()
        too_big = any(self.world_size * amount > total.get(kind, 0.0) for kind, amount in self.bundle().items())
        if not (self.fixed_cluster and too_big):
            self.placement_group = placement_group(bundles, strategy=self.cfg.placement_strategy)
            ready, _ = ray.wait([self.placement_group.ready()], timeout=self.cfg.start_timeout_s)
            if ready:
                return
            remove_placement_group(self.placement_group)
            self.placement_group = None
        waited = "" if self.fixed_cluster and too_big else f" within ray.start_timeout_s={self.cfg.start_timeout_s:g} s"
        raise PlacementError(
            f"could not place {self.world_size} workers of {self._bundle_text()} each "
            f"(strategy {self.cfg.placement_strategy}){waited}; the cluster has "
            f"{_format_resources(total)} in total and {_format_resources(ray.available_resources())} free. "
            "Lower ray.cpus_per_worker / ray.gpus_per_worker, use fewer ranks (parallel sizes), "
            "relax ray.placement_strategy, or add nodes."
        )

    def _environments(self, nodes: list[tuple[str, str, list[str]]]) -> list[dict[str, str]]:
        """torch.distributed variables per rank; on GPUs, every rank of a node sees all of that node's GPUs.

        Ray shows each actor only its own GPU, but LOCAL_RANK-based ``torch.cuda.set_device`` (megatron) and
        NCCL's peer-to-peer paths want the node's full list, with LOCAL_RANK indexing this rank's GPU in it.
        """
        ranks_by_node: dict[str, list[int]] = {}
        for rank, (_, node_id, _) in enumerate(nodes):
            ranks_by_node.setdefault(node_id, []).append(rank)
        envs = []
        for rank, (_, node_id, gpus) in enumerate(nodes):
            peers = ranks_by_node[node_id]
            env = {
                **self.cfg.env,
                "RANK": str(rank),
                "WORLD_SIZE": str(self.world_size),
                "LOCAL_RANK": str(peers.index(rank)),
                "LOCAL_WORLD_SIZE": str(len(peers)),
                "MASTER_ADDR": self.master_addr,
                "MASTER_PORT": str(self.master_port),
                "OMP_NUM_THREADS": str(max(1, int(self.cfg.cpus_per_worker))),
                NODE_ID_ENV: node_id,  # for the run's report: which node each rank ran on
            }
            node_gpus = sorted({g for r in peers for g in nodes[r][2]}, key=lambda g: (len(g), g))
            if gpus and node_gpus:
                env["CUDA_VISIBLE_DEVICES"] = ",".join(node_gpus)
                env["LOCAL_RANK"] = str(node_gpus.index(gpus[0]))
            envs.append(env)
        return envs

    def run(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` on every rank; rank 0's result, or GroupFailed when any rank fails."""
        if not self.actors:
            raise RuntimeError("WorkerGroup.run before start()")
        return wait_all([a.run.remote(fn, args) for a in self.actors])[0]

    def shutdown(self) -> None:
        """Kill every actor (survivors of a failure would hang in collectives) and free the bundles."""
        import ray
        from ray.util import remove_placement_group

        for actor in self.actors:
            try:
                ray.kill(actor, no_restart=True)
            except Exception as e:  # already dead
                log.debug("kill: %s", e)
        self.actors = []
        if self.placement_group is not None:
            remove_placement_group(self.placement_group)
            self.placement_group = None


def run_worker_group(fn: Callable[..., T], args: Sequence[Any] = (), *, world_size: int,
                     cfg: RayWorkersConfig) -> T:
    """Run ``fn(*args)`` on ``world_size`` ranks under Ray and return rank 0's result.

    ``fn`` must be picklable (a module-level function) and resume from its own checkpoint: when a rank
    raises or its process dies, every rank is killed and the group started again, up to
    ``cfg.max_restarts`` times. A CompressorError (bad config or data) is raised at once, since a restart
    would only repeat it; otherwise the last failure is raised as WorkerGroupError naming the rank.
    """
    attempts = cfg.max_restarts + 1
    t0 = time.monotonic()
    with ray_cluster(cfg) as started_here:
        for attempt in range(1, attempts + 1):
            group = WorkerGroup(world_size, cfg, fixed_cluster=started_here)
            try:
                group.start()
                result = group.run(fn, *args)
                log.info("worker group finished in %.1f s after %d attempt(s)", time.monotonic() - t0, attempt)
                return result
            except GroupFailed as failed:
                root = failed.root
                if isinstance(root.error, CompressorError):
                    raise root.error
                lost = group.lost_nodes_text(wait_s=NODE_DEATH_WAIT_S if root.died else 0.0)
                if attempt == attempts:
                    raise WorkerGroupError(
                        f"the worker group failed on attempt {attempt} of {attempts} (ray.max_restarts="
                        f"{cfg.max_restarts}): {failed}{lost}; run again with --resume to continue from the last "
                        "checkpoint", root.rank, root.error
                    ) from root.error
                log.warning("attempt %d of %d failed: %s%s; restarting all %d ranks (they resume from the last "
                            "checkpoint)", attempt, attempts, failed, lost, world_size)
            finally:
                group.shutdown()
    raise AssertionError("unreachable")
