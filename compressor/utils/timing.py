"""Wall-clock and peak-memory accounting by named phase, so reports can separate e.g. pruning from evaluation."""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager
from typing import Iterator

from compressor.utils.env import restart_peak_rss


class PhaseTimer:
    """Seconds per phase and, where the OS can restart its high-water mark (Linux), this process's peak
    RSS per phase: a whole-run peak says little when loading or tokenizing, not the work, set it."""

    def __init__(self, track_memory: bool = True) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.peaks: dict[str, int] = {}
        self._open: list[str] = []
        self._memory = track_memory
        # what the per-phase peaks cost (mark restarts, and heap trims): outside each phase's own seconds,
        # inside an enclosing phase's
        self.accounting_seconds = 0.0
        self.boundaries = 0
        self.trims = 0
        self._last_closed: str | None = None

    def _flush_peak(self, release: bool) -> None:
        """Charge the peak since the last boundary to every open phase, and restart the mark from the live
        memory (with ``release``, freed heap blocks go back to the OS first, or the next phase would reuse
        them unseen)."""
        if not self._memory:
            return
        start = time.perf_counter()
        peak = restart_peak_rss(release)
        self.accounting_seconds += time.perf_counter() - start
        self.boundaries += 1
        self.trims += release
        if peak is None:
            self._memory = False
            return
        for name in self._open:
            self.peaks[name] = max(self.peaks.get(name, 0), peak)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        # The heap is trimmed when a phase starts, unless the same phase just ended (a training loop's
        # steps): the step reuses what the one before it freed, and a trim per step walks a heap of GiBs.
        self._flush_peak(release=name != self._last_closed)
        self._open.append(name)
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - start
            self._flush_peak(release=False)  # the next phase's start trims
            self._open.remove(name)
            self._last_closed = name

    def as_dict(self) -> dict[str, float]:
        return {k: round(v, 3) for k, v in self.seconds.items()}

    def peak_rss_by_phase(self) -> dict[str, int]:
        """Bytes: each phase's highest RSS over all its entries (empty where not measurable)."""
        return dict(self.peaks)


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
