"""The executor interface.

A job is a plain function plus arguments. ``put`` stores a large object once (for Ray: in the object
store) and returns a handle that can be passed as a top-level argument to any number of jobs;
``submit`` starts a job and returns a handle, which may also be passed as a top-level argument to later
jobs (they then start when it is done, and receive its result); ``wait`` returns when any job is
done; ``gather`` waits for jobs in order, with a progress bar.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Callable, Literal, Optional, Sequence

from pydantic import NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt

from compressor.config.base import StrictModel


class ExecutorConfig(StrictModel):
    kind: Literal["ray", "inprocess"] = "ray"
    address: Optional[str] = None  # join an existing Ray cluster ("auto" or host:port); None starts a local one
    num_cpus: Optional[PositiveInt] = None  # CPUs for a local cluster (default: all)
    object_store_mb: PositiveInt = 512  # object store size for a local cluster
    task_cpus: PositiveFloat = 1.0  # CPUs reserved per task (also its torch thread count)
    task_gpus: NonNegativeFloat = 0.0  # GPU fraction per task on a GPU cluster
    max_retries: NonNegativeInt = 3  # re-runs of a task whose worker died
    # DEFAULT: Ray fills the driver's node first; SPREAD: tasks go round the nodes (a cluster of several)
    scheduling: Literal["DEFAULT", "SPREAD"] = "DEFAULT"


class Executor(ABC):
    @abstractmethod
    def put(self, value: Any) -> Any:
        """Store ``value`` once; the handle may be passed as a top-level argument to jobs."""

    @abstractmethod
    def submit(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Start ``fn(*args, **kwargs)``; returns a handle for ``gather``."""

    @abstractmethod
    def gather(self, handles: Sequence[Any], desc: str | None = None) -> list[Any]:
        """Results of the given jobs, in order."""

    def wait(self, handles: Sequence[Any]) -> tuple[list[Any], list[Any]]:
        """Block until at least one of ``handles`` is done: (done, still pending), each in input order."""
        return list(handles), []  # executors that run jobs at submit time

    def map(self, fn: Callable[..., Any], items: Sequence[Any], desc: str | None = None) -> list[Any]:
        return self.gather([self.submit(fn, item) for item in items], desc)

    @property
    def parallelism(self) -> int:
        return 1

    def describe(self) -> dict[str, Any]:
        """Where the jobs ran, for a run's report."""
        return {"kind": "inprocess"}

    def close(self) -> None:
        pass

    def __enter__(self) -> "Executor":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class _Done:
    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value


class InProcessExecutor(Executor):
    """Runs each job at ``submit`` time in this process: for debugging and for tiny problems."""

    def put(self, value: Any) -> Any:
        return value

    def submit(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> _Done:
        args = tuple(a.value if isinstance(a, _Done) else a for a in args)
        kwargs = {k: v.value if isinstance(v, _Done) else v for k, v in kwargs.items()}
        return _Done(fn(*args, **kwargs))

    def gather(self, handles: Sequence[Any], desc: str | None = None) -> list[Any]:
        return [h.value for h in handles]


def make_executor(cfg: ExecutorConfig) -> Executor:
    if cfg.kind == "inprocess":
        return InProcessExecutor()
    from compressor.execution.ray_executor import RayExecutor

    return RayExecutor(cfg)
