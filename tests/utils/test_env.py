"""What a report or a benchmark result records about its host."""

import json
import sys
from pathlib import Path

import torch

from compressor.precision import bf16_hardware
from compressor.utils.env import cpu_model, environment_info

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from results_io import read_results, write_results  # noqa: E402


def test_environment_names_the_cpu_and_the_bf16_path_products_take():
    info = environment_info()
    assert info["cpu"] == cpu_model() and info["cpu"]
    assert info["bf16_hardware"] == bf16_hardware() in {"amx", "avx512_bf16", "cuda", "none"}
    assert info["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert info["torch_threads"] == torch.get_num_threads()


def test_bench_results_carry_the_host_and_replace_the_old_file_whole(tmp_path):
    path = tmp_path / "results" / "x.json"
    assert read_results(path) == {}
    write_results(path, {"rows": [1]})
    write_results(path, {**read_results(path), "more": 2})
    saved = json.loads(path.read_text())
    assert saved["rows"] == [1] and saved["more"] == 2
    assert saved["environment"]["cpu"] == cpu_model()
    assert [p.name for p in path.parent.iterdir()] == ["x.json"]  # no temporary file left behind
