"""Atomic writes: a failed write names the file and the cause, leaves the old content and no temporary file."""

from __future__ import annotations

import errno
import os

import pytest
import torch

from compressor.errors import CompressorError, OutputWriteError
from compressor.utils.fs import atomic_dir, atomic_save_safetensors, atomic_write_text, read_json


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EACCES, errno.EROFS])
def test_a_failed_rename_keeps_the_old_file_and_names_the_cause(tmp_path, monkeypatch, code):
    target = tmp_path / "report.json"
    target.write_text("old")

    def fail(*args):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OutputWriteError, match=rf"cannot write {target}: {os.strerror(code)}"):
        atomic_write_text(target, "new")
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]


def test_safetensors_write_errors_are_named(tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    with pytest.raises(OutputWriteError, match=rf"cannot write {blocker / 'a.safetensors'}: File exists"):
        atomic_save_safetensors({"t": torch.ones(2)}, blocker / "a.safetensors")


def test_a_failed_folder_write_leaves_nothing(tmp_path):
    with pytest.raises(OutputWriteError, match="No space left"):
        with atomic_dir(tmp_path / "model") as tmp:
            (tmp / "part").write_text("half")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert list(tmp_path.iterdir()) == []


def test_read_json_names_the_file(tmp_path):
    (tmp_path / "a.json").write_text("{oops")
    with pytest.raises(CompressorError, match=r"a\.json is not valid JSON"):
        read_json(tmp_path / "a.json")
    with pytest.raises(CompressorError, match=r"b\.json is missing"):
        read_json(tmp_path / "b.json")
