"""Learnable masks wrap megatron-core's ColumnParallelLinear / RowParallelLinear without changing their math."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("megatron.core")
ROOT = Path(__file__).resolve().parents[3]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.distributed
def test_masks_on_megatron_parallel_linears():
    # A subprocess: megatron's parallel state and the process group are global and must not leak into other tests.
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "tests.methods.maskllm._megatron_check"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "MEGATRON-OK" in done.stdout, done.stderr[-3000:]
