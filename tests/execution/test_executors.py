"""A job's handle can feed later jobs, in process and on Ray alike."""

import pytest
import torch

from compressor.execution.base import ExecutorConfig, InProcessExecutor, make_executor


def _scaled(x, factor):
    return x * factor


def _check_chained(executor):
    base = executor.put(torch.arange(4.0))
    first = executor.submit(_scaled, base, 2.0)
    second = executor.submit(_scaled, first, 3.0)  # starts when `first` is done, receives its tensor
    out = executor.gather([first, second])
    assert torch.equal(out[0], torch.arange(4.0) * 2) and torch.equal(out[1], torch.arange(4.0) * 6)


def test_in_process_handles_feed_later_jobs():
    _check_chained(InProcessExecutor())


@pytest.mark.ray
def test_ray_handles_feed_later_jobs():
    with make_executor(ExecutorConfig(kind="ray", num_cpus=2, object_store_mb=500)) as executor:
        _check_chained(executor)
