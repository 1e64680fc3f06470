"""A run's peak RSS is its own: a process started by a large parent does not report the parent's memory
(Linux's ru_maxrss carries the RSS at the fork before exec; VmHWM does not)."""

import subprocess
import sys

from compressor.utils.env import peak_rss_bytes

MiB = 2**20


def test_a_child_of_a_large_process_reports_its_own_peak():
    ballast = bytearray(768 * MiB)
    ballast[::4096] = b"\x01" * len(ballast[::4096])  # resident, not only reserved
    assert peak_rss_bytes() > 768 * MiB
    code = "from compressor.utils.env import peak_rss_bytes; print(peak_rss_bytes())"
    child = int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert 0 < child < 256 * MiB  # a bare interpreter, not the 768 MiB it was forked from
    del ballast
