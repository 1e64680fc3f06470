"""Shards written by Ray tasks on 2 workers are byte-identical to in-process ones, and read back the same."""

import pytest

from compressor.checkpoints.convert import ExportOptions, convert_checkpoint
from compressor.checkpoints.load import read_state_dict
from compressor.execution.base import ExecutorConfig, make_executor
from tests.checkpoints.conftest import same_bits


@pytest.mark.ray
def test_ray_shards_are_byte_identical_to_in_process(pruned_dir, pruned_state, compressed_dir, tmp_path):
    opts = ExportOptions(shard_size="100KB")  # as compressed_dir: several shards, so jobs run in parallel
    with make_executor(ExecutorConfig(kind="ray", num_cpus=2, object_store_mb=500)) as executor:
        assert executor.parallelism == 2
        summary = convert_checkpoint(pruned_dir, tmp_path / "ray", opts, executor=executor)
        state = read_state_dict(tmp_path / "ray", executor=executor)
    files = sorted(p.name for p in compressed_dir.iterdir())
    assert summary.shards >= 3 and files == sorted(p.name for p in (tmp_path / "ray").iterdir())
    for name in files:
        assert (compressed_dir / name).read_bytes() == (tmp_path / "ray" / name).read_bytes(), name
    assert all(same_bits(state[k], v) for k, v in pruned_state.items())
