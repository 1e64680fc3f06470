"""The pieces of the simulated cluster that need no Ray: the process tree it stops, the configs it relies on."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
from pydantic import ValidationError

from compressor.execution.base import ExecutorConfig
from compressor.execution.local_cluster import _descendants, _stop_group
from compressor.parallel.ray_config import RayWorkersConfig


def test_stopping_a_node_kills_children_that_left_its_process_group():
    # the child starts a session of its own, as the raylet's workers sit in groups of their own
    child = "import subprocess, sys; subprocess.Popen(['sleep', '60'], start_new_session=True).wait()"
    proc = subprocess.Popen([sys.executable, "-c", child], start_new_session=True)
    deadline = time.monotonic() + 10
    while not _descendants(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    children = _descendants(proc.pid)
    assert children, "the test's child process never started"
    _stop_group(proc, hard=True)
    time.sleep(0.2)
    states = [subprocess.run(["ps", "-p", str(pid), "-o", "stat="], capture_output=True, text=True).stdout.strip()
              for pid in children]
    alive = [s for s in states if s and not s.startswith("Z")]  # gone, or a zombie waiting for its reaper
    assert proc.poll() is not None and not alive


def test_strategies_are_validated():
    assert ExecutorConfig(scheduling="SPREAD").scheduling == "SPREAD"
    assert RayWorkersConfig(placement_strategy="STRICT_SPREAD").placement_strategy == "STRICT_SPREAD"
    with pytest.raises(ValidationError, match="scheduling"):
        ExecutorConfig(scheduling="ROUND_ROBIN")
    with pytest.raises(ValidationError, match="placement_strategy"):
        RayWorkersConfig(placement_strategy="spread")
