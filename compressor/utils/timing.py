"""Wall-clock accounting by named phase, so reports can separate e.g. pruning from evaluation."""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager
from typing import Iterator


class PhaseTimer:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - start

    def as_dict(self) -> dict[str, float]:
        return {k: round(v, 3) for k, v in self.seconds.items()}


class WindowClock:
    """Seconds since the last ``restart``, minus the time spent inside ``paused()``: throughput windows
    of a training loop that leave out evaluation and checkpoints."""

    def __init__(self) -> None:
        self.restart()

    def restart(self) -> None:
        self.start, self.excluded = time.perf_counter(), 0.0

    @contextmanager
    def paused(self) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.excluded += time.perf_counter() - start

    def seconds(self) -> float:
        return time.perf_counter() - self.start - self.excluded
