"""Jobs with dependencies on an executor, critical path first (a list scheduler in the driver).

Ray starts queued tasks in the order they became ready, so a job that waits for a long one (a layer
waiting for the Hessian factor of a wide input) ends up behind every short job submitted meanwhile and
runs last, on one worker, while the others idle. Here the driver keeps only about as many jobs in
flight as there are workers and always submits, among the jobs whose inputs are done, the one with the
longest chain of work still behind it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Hashable, Optional

from compressor.execution.base import Executor


@dataclasses.dataclass(frozen=True)
class After:
    """Placeholder argument: the result of the job with this key."""

    key: Hashable


@dataclasses.dataclass
class Job:
    key: Hashable
    fn: Callable[..., Any]
    args: tuple
    cost: float  # any unit, the same for all jobs: what orders the critical path

    @property
    def deps(self) -> list[Hashable]:
        return [a.key for a in self.args if isinstance(a, After)]


def critical_path(jobs: list[Job]) -> dict[Hashable, float]:
    """Each job's cost plus the longest chain of dependent jobs after it (its upward rank)."""
    by_key = {j.key: j for j in jobs}
    dependents: dict[Hashable, list[Hashable]] = {k: [] for k in by_key}
    for j in jobs:
        for d in j.deps:
            if d not in by_key:
                raise ValueError(f"job {j.key!r} depends on {d!r}, which is not among the jobs")
            dependents[d].append(j.key)
    rank: dict[Hashable, float] = {}

    def visit(key: Hashable, path: tuple = ()) -> float:
        if key in path:
            raise ValueError(f"jobs depend on each other in a cycle: {[*path, key]}")
        if key not in rank:
            rank[key] = by_key[key].cost + max((visit(d, (*path, key)) for d in dependents[key]), default=0.0)
        return rank[key]

    for key in by_key:
        visit(key)
    return rank


def run_jobs(executor: Executor, jobs: list[Job], in_flight: Optional[int] = None) -> dict[Hashable, Any]:
    """Run all ``jobs``; returns {key: handle}, every one finished (``executor.gather`` reads them).

    At most ``in_flight`` jobs (default: the executor's parallelism + 1, so that a worker finds its next
    job waiting) are submitted and unfinished at any time; ties in rank go to the earlier job in the list.
    """
    rank = critical_path(jobs)
    limit = in_flight or executor.parallelism + 1
    waiting = sorted(range(len(jobs)), key=lambda i: (-rank[jobs[i].key], i))
    handles: dict[Hashable, Any] = {}
    done: set[Hashable] = set()
    running: dict[Any, Hashable] = {}  # handle id -> key
    pending: list[Any] = []
    while waiting or pending:
        while len(pending) < limit:
            ready = next((i for i in waiting if all(d in done for d in jobs[i].deps)), None)
            if ready is None:
                break
            waiting.remove(ready)
            job = jobs[ready]
            args = tuple(handles[a.key] if isinstance(a, After) else a for a in job.args)
            handle = executor.submit(job.fn, *args)
            handles[job.key] = handle
            running[id(handle)] = job.key
            pending.append(handle)
        if not pending:
            raise RuntimeError("run_jobs: no job can start (a dependency never finishes)")
        finished, pending = executor.wait(pending)
        done.update(running.pop(id(h)) for h in finished)
    return handles
