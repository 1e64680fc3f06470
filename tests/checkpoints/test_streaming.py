"""``stream_safetensors``: a file written tensor by tensor reads like one written whole."""

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from compressor.checkpoints.streaming import stream_safetensors


def test_streamed_file_equals_the_tensors_and_keeps_metadata(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {"b.weight": torch.randn(3, 5, generator=g), "a.bias": torch.randn(7, generator=g).bfloat16(),
               "mask": torch.rand(4, 9, generator=g) > 0.5, "bits": torch.randint(0, 255, (2, 3), dtype=torch.uint8),
               "empty": torch.zeros(0, 4), "scalar": torch.tensor(2.5)}
    path = tmp_path / "x.safetensors"
    with stream_safetensors(path, [(n, t.dtype, t.shape) for n, t in tensors.items()], {"format": "pt"}) as write:
        for name, t in tensors.items():
            write(name, t)
    back = load_file(str(path))
    assert back.keys() == tensors.keys()
    for name, t in tensors.items():
        assert back[name].dtype == t.dtype and torch.equal(back[name], t), name
    with safe_open(str(path), framework="pt") as fh:
        assert fh.metadata() == {"format": "pt"}


def test_a_stream_out_of_order_or_incomplete_leaves_no_file(tmp_path):
    entries = [("a", torch.float32, (2,)), ("b", torch.float32, (3,))]
    path = tmp_path / "x.safetensors"
    with pytest.raises(ValueError, match="expected a"):
        with stream_safetensors(path, entries) as write:
            write("b", torch.zeros(3))
    with pytest.raises(ValueError, match="b was never written"):
        with stream_safetensors(path, entries) as write:
            write("a", torch.zeros(2))
    with pytest.raises(ValueError, match="declared"):
        with stream_safetensors(path, entries) as write:
            write("a", torch.zeros(3))
    assert list(tmp_path.iterdir()) == []
