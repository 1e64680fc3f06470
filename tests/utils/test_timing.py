"""WindowClock leaves paused time (evaluation, checkpoints) out of a throughput window."""

import time

from compressor.utils.timing import WindowClock


def test_paused_time_is_left_out_and_restart_begins_a_new_window():
    clock = WindowClock()
    time.sleep(0.05)
    with clock.paused():
        time.sleep(0.2)
    time.sleep(0.05)
    assert 0.09 <= clock.seconds() < 0.2  # about 0.1 s of work; the 0.2 s pause is not counted
    clock.restart()
    assert clock.seconds() < 0.05
