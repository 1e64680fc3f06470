"""Executor on Ray tasks: a local cluster by default, or an existing one by address."""

from __future__ import annotations

import os
from typing import Any, Callable, Sequence

from tqdm.auto import tqdm

from compressor.execution.base import Executor, ExecutorConfig
from compressor.utils.logging import get_logger

log = get_logger(__name__)


def _run_with_threads(threads: int, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    # Each task gets as many torch threads as CPUs it reserved, so tasks do not oversubscribe cores.
    import torch

    torch.set_num_threads(max(1, threads))
    return fn(*args, **kwargs)


class RayExecutor(Executor):
    def __init__(self, cfg: ExecutorConfig) -> None:
        import ray

        self.cfg = cfg
        self._started = False
        if not ray.is_initialized():
            os.environ.setdefault("RAY_AUTH_MODE", "disabled")
            kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": True}
            if cfg.address:
                kwargs["address"] = cfg.address
            else:  # "local": a new cluster even if someone else's `ray start` runs on this machine
                kwargs["address"] = "local"
                kwargs["num_cpus"] = cfg.num_cpus or os.cpu_count()
                kwargs["object_store_memory"] = cfg.object_store_mb * 1024 * 1024
            ray.init(**kwargs)
            self._started = True
            log.info("ray: %s", "joined " + cfg.address if cfg.address else "started a local cluster")
        self._remote = ray.remote(_run_with_threads).options(
            num_cpus=cfg.task_cpus, num_gpus=cfg.task_gpus, max_retries=cfg.max_retries
        )

    @property
    def parallelism(self) -> int:
        import ray

        cpus = ray.available_resources().get("CPU", 1.0)
        return max(1, int(cpus // self.cfg.task_cpus))

    def put(self, value: Any) -> Any:
        import ray

        return ray.put(value)

    def submit(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return self._remote.remote(int(self.cfg.task_cpus), fn, *args, **kwargs)

    def gather(self, handles: Sequence[Any], desc: str | None = None) -> list[Any]:
        import ray

        pending = list(handles)
        with tqdm(total=len(pending), desc=desc, disable=desc is None, leave=False) as bar:
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                bar.update(len(done))
        return ray.get(list(handles))

    def close(self) -> None:
        import ray

        if self._started and ray.is_initialized():
            ray.shutdown()
            self._started = False
