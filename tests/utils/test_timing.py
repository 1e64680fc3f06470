"""WindowClock leaves paused time (evaluation, checkpoints) out of a throughput window; PhaseTimer keeps
each phase's own peak RSS."""

import time

import pytest

from compressor.utils.env import peak_rss_bytes, restart_peak_rss
from compressor.utils.timing import PhaseTimer, WindowClock

MiB = 2**20
needs_reset = pytest.mark.skipif(restart_peak_rss() is None, reason="this OS cannot restart the RSS high-water mark "
                                 "(Linux /proc/self/clear_refs)")


def test_paused_time_is_left_out_and_restart_begins_a_new_window():
    clock = WindowClock()
    time.sleep(0.05)
    with clock.paused():
        time.sleep(0.2)
    time.sleep(0.05)
    assert 0.09 <= clock.seconds() < 0.2  # about 0.1 s of work; the 0.2 s pause is not counted
    clock.restart()
    assert clock.seconds() < 0.05


def _touch(mib: int) -> None:
    ballast = bytearray(mib * MiB)
    ballast[::4096] = b"\x01" * len(ballast[::4096])  # resident, not only reserved
    del ballast


@needs_reset
def test_each_phase_records_its_own_peak_and_the_run_peak_survives_the_resets():
    timer = PhaseTimer()
    with timer.phase("small"):
        pass
    with timer.phase("large"):
        _touch(384)
    with timer.phase("after"):
        pass
    peaks = timer.peak_rss_by_phase()
    assert set(peaks) == {"small", "large", "after"}
    assert peaks["large"] > peaks["small"] + 300 * MiB  # freed memory leaves the later phase's peak alone
    assert peaks["after"] < peaks["large"] - 300 * MiB
    assert peak_rss_bytes() >= peaks["large"]  # the whole run's peak is kept across the resets
    assert timer.boundaries == 6 and timer.trims == 3 and timer.accounting_seconds > 0  # what the peaks cost
    untracked = PhaseTimer(track_memory=False)
    with untracked.phase("small"):
        pass
    assert untracked.boundaries == untracked.trims == 0 and untracked.accounting_seconds == 0


@needs_reset
def test_a_phase_entered_again_straight_after_itself_is_not_trimmed_again():
    """A training loop's steps: one heap trim for a run of steps, not two per step; each step's peak is
    still charged to it, and a different phase in between trims again."""
    timer = PhaseTimer()
    for _ in range(5):
        with timer.phase("step"):
            _touch(64)
    with timer.phase("evaluate"):
        pass
    with timer.phase("step"):
        pass
    assert timer.boundaries == 14 and timer.trims == 3  # the first step, the evaluation, the step after it
    peaks = timer.peak_rss_by_phase()
    assert peaks["step"] > peaks["evaluate"] + 48 * MiB


@needs_reset
def test_a_nested_phase_charges_its_peak_to_the_enclosing_one_too():
    timer = PhaseTimer()
    with timer.phase("before"):
        pass
    with timer.phase("outer"):
        with timer.phase("inner"):
            _touch(256)
        with timer.phase("later"):
            pass
    peaks = timer.peak_rss_by_phase()
    assert peaks["outer"] >= peaks["inner"] > peaks["before"] + 200 * MiB
    assert peaks["later"] < peaks["inner"] - 200 * MiB
