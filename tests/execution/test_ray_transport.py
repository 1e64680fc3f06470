"""Tensors cross Ray's object store as numpy arrays and come back equal, dtype included."""

import torch

from compressor.calibration.stats import InputStats
from compressor.execution.ray_executor import _Array, pack, unpack
from compressor.methods.registry import LayerResult


def test_pack_round_trips_tensors_inside_dataclasses_and_containers():
    stats = InputStats("gram", 3, 5, None, torch.randn(3, 3, dtype=torch.float64))
    result = LayerResult("w", torch.rand(2, 4) > 0.5, torch.randn(2, 4).to(torch.bfloat16), 0.1, {"swaps": 3})
    packed = pack((stats, [result], {"x": torch.arange(4)}))
    assert isinstance(packed[0].gram, _Array) and isinstance(packed[1][0].weight, _Array)
    back_stats, (back_result,), extra = unpack(packed)
    assert torch.equal(back_stats.gram, stats.gram) and back_stats.gram.dtype == torch.float64
    assert back_stats.col_sq is None and back_stats.tokens == 5
    assert back_result.weight.dtype == torch.bfloat16 and torch.equal(back_result.weight, result.weight)
    assert back_result.mask.dtype == torch.bool and torch.equal(back_result.mask, result.mask)
    assert back_result.extra == {"swaps": 3} and torch.equal(extra["x"], torch.arange(4))


def test_read_only_arrays_are_copied_before_torch_can_write_into_them():
    array = _Array(torch.ones(3))
    array.array.setflags(write=False)  # as Ray hands out object-store memory
    t = array.tensor()
    t += 1  # must not touch the shared buffer
    assert float(array.array.sum()) == 3.0 and float(t.sum()) == 6.0


def test_shared_arrays_reach_jobs_without_a_copy_and_the_driver_with_one():
    source = torch.arange(6.0)
    shared, private = pack(source, shared=True), pack(source)
    for packed in (shared, private):
        packed.array.setflags(write=False)
    in_job = unpack(shared, writable=False)
    assert in_job.data_ptr() == shared.array.ctypes.data  # a view of the object store's memory
    assert unpack(private, writable=False).data_ptr() != private.array.ctypes.data
    in_driver = unpack(shared)
    assert in_driver.data_ptr() != shared.array.ctypes.data and torch.equal(in_driver, source)
