"""Per-layer CPU work on a few threads, each running torch single-threaded."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Optional, Sequence, TypeVar

import torch

T = TypeVar("T")
R = TypeVar("R")


def thread_map(fn: Callable[[T], R], items: Sequence[T], cost: Optional[Callable[[T], float]] = None,
               workers: Optional[int] = None) -> list[R]:
    """``[fn(x) for x in items]``, computed on ``workers`` threads (default: torch's thread count).

    For many independent, mid-sized tensor jobs (one per layer) where part of the work is serial in
    torch (the CPU random generator) and the rest is a handful of element-wise passes: whole jobs side
    by side, each single-threaded, beat one job at a time on all cores and avoid two OpenMP teams
    fighting over the cores. ``fn`` must not depend on which thread runs it or in which order (a
    per-layer generator keeps random draws deterministic). ``cost`` orders the jobs, largest first, for
    balance. One worker, or a single item, runs inline.
    """
    items = list(items)
    workers = min(workers or torch.get_num_threads(), len(items))
    if workers <= 1:
        return [fn(x) for x in items]
    order = sorted(range(len(items)), key=lambda i: -cost(items[i])) if cost else list(range(len(items)))
    main_threads = torch.get_num_threads()

    def single_threaded(i: int) -> R:
        torch.set_num_threads(1)  # this thread's OpenMP team only (and the process default, reset below)
        return fn(items[i])

    try:
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="layer") as pool:
            done = list(pool.map(single_threaded, order))
    finally:
        torch.set_num_threads(main_threads)
    results: list = [None] * len(items)
    for i, r in zip(order, done):
        results[i] = r
    return results
