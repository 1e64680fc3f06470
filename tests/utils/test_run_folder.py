"""The output-folder policy: what a command may create, continue or replace, and what it never touches."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from compressor.errors import OutputExistsError
from compressor.utils.run_folder import (
    check_apart_from_inputs, check_output_file, check_output_target, nesting, open_run_folder, read_marker,
    run_folder, write_marker,
)


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` with its content (symlinks by their target)."""
    out = {}
    for path in sorted(root.rglob("*")):
        if path.is_symlink():
            out[str(path.relative_to(root))] = os.readlink(path).encode()
        elif path.is_file():
            out[str(path.relative_to(root))] = path.read_bytes()
    return out


def brute_nesting(a: Path, b: Path):
    ra, rb = os.path.realpath(a), os.path.realpath(b)
    if ra == rb:
        return "is"
    common = os.path.commonpath([ra, rb])
    return "lies inside" if common == rb else "contains" if common == ra else None


def test_nesting_matches_a_brute_force_over_random_trees_with_symlinks(tmp_path):
    rng = random.Random(0)
    folders = [tmp_path]
    for i in range(30):  # a random tree
        folders.append(rng.choice(folders) / f"d{i}")
        folders[-1].mkdir()
    for i in range(10):  # symlinks to random folders, placed at random
        link = rng.choice(folders) / f"l{i}"
        link.symlink_to(rng.choice(folders[1:]), target_is_directory=True)
        folders.append(link)
    candidates = folders + [f / "new" / "run" for f in rng.sample(folders, 10)]  # outputs that do not exist yet
    for _ in range(2000):
        a, b = rng.choice(candidates), rng.choice(folders)
        assert nesting(a, b) == brute_nesting(a, b), (a, b)


@pytest.mark.parametrize("where", ["is", "inside", "contains", "symlink"])
def test_an_output_overlapping_an_input_is_refused_before_anything_is_touched(tmp_path, where):
    model = tmp_path / "models" / "m"
    model.mkdir(parents=True)
    (model / "config.json").write_text("{}")
    (tmp_path / "link").symlink_to(model)
    output = {"is": model, "inside": model / "run", "contains": tmp_path / "models", "symlink": tmp_path / "link"}[where]
    before = snapshot(tmp_path)
    for overwrite, resume in [(False, False), (True, False), (False, True)]:
        with pytest.raises(OutputExistsError, match=r"the model\.source .*outside every input"):
            open_run_folder(output, "prune", {"model.source": str(model)}, overwrite=overwrite, resume=resume)
    assert snapshot(tmp_path) == before
    check_apart_from_inputs(tmp_path / "elsewhere", {"model.source": str(model), "hub": "org/name"})


def _marked(path: Path, command: str = "prune", results: bool = False, finished: bool = False) -> Path:
    folder = open_run_folder(path, command)
    (folder.path / "config.yaml").write_text("method: wanda\n")
    if results:
        (folder.path / ".work").mkdir()
        (folder.path / ".work" / "block_00000.safetensors").write_bytes(b"result")
    if finished:
        (folder.path / "report.json").write_text("{}")
    return folder.path


STATES = ["missing", "empty", "user_files", "model_folder", "setup_only", "unfinished", "finished", "file"]


def _make(state: str, path: Path) -> None:
    if state == "empty":
        path.mkdir()
    elif state == "user_files":
        path.mkdir()
        (path / "notes.txt").write_text("my notes")
    elif state == "model_folder":
        path.mkdir()
        (path / "config.json").write_text("{}")
        (path / "model.safetensors").write_bytes(b"weights")
    elif state == "file":
        path.write_text("a file")
    elif state != "missing":
        _marked(path, results=state != "setup_only", finished=state == "finished")


# state -> (no flags, --resume, --overwrite): "new", "resume" or the error's words
EXPECTED = {
    "missing": ("new", "new", "new"),
    "empty": ("new", "new", "new"),
    "user_files": ("did not create", "did not create", "did not create"),
    "model_folder": ("did not create", "did not create", "did not create"),
    "setup_only": ("new", "new", "new"),  # a run that failed before its first result blocks nothing
    "unfinished": ("pass --resume", "resume", "new"),
    "finished": ("finished run", "finished run", "new"),
    "file": ("is a file", "is a file", "is a file"),
}


@pytest.mark.parametrize("state", STATES)
@pytest.mark.parametrize("flags", ["none", "resume", "overwrite"])
def test_policy_over_every_folder_state(tmp_path, state, flags):
    path = tmp_path / "out"
    _make(state, path)
    before = snapshot(tmp_path)
    expected = EXPECTED[state][["none", "resume", "overwrite"].index(flags)]
    if expected in ("new", "resume"):
        folder = open_run_folder(path, "prune", overwrite=flags == "overwrite", resume=flags == "resume")
        assert folder.resumed == (expected == "resume") and read_marker(path)["command"] == "prune"
        if expected == "new":
            assert not (path / "config.yaml").exists() and not (path / "report.json").exists()
    else:
        with pytest.raises(OutputExistsError, match=expected):
            open_run_folder(path, "prune", overwrite=flags == "overwrite", resume=flags == "resume")
        assert snapshot(tmp_path) == before  # refused: nothing touched


def test_overwrite_keeps_the_old_run_until_the_new_one_finishes(tmp_path):
    path = _marked(tmp_path / "out", finished=True)
    old = snapshot(path)
    with run_folder(path, "prune", overwrite=True) as folder:
        aside = folder.replaces[0]
        assert snapshot(aside) == old and not (path / "report.json").exists()
        (path / "report.json").write_text('{"new": true}')
    assert not aside.exists() and (path / "report.json").read_text() == '{"new": true}'
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_an_overwrite_that_fails_before_any_result_puts_the_old_run_back(tmp_path):
    path = _marked(tmp_path / "out", finished=True)
    old = snapshot(path)
    with pytest.raises(RuntimeError, match="model not found"):
        with run_folder(path, "prune", overwrite=True):
            (path / "config.yaml").write_text("new config")
            raise RuntimeError("model not found")
    assert snapshot(path) == old and [p.name for p in tmp_path.iterdir()] == ["out"]


def test_an_overwrite_killed_before_any_result_is_undone_by_the_next_command(tmp_path):
    path = _marked(tmp_path / "out", finished=True)
    old = snapshot(path)
    open_run_folder(path, "prune", overwrite=True)  # then killed: no abandon() ran
    assert snapshot(path) != old
    with pytest.raises(OutputExistsError, match="finished run"):  # the old run is back, and finished
        open_run_folder(path, "prune")
    assert snapshot(path) == old and [p.name for p in tmp_path.iterdir()] == ["out"]


def test_an_overwrite_that_fails_after_results_is_resumable_and_keeps_the_old_run(tmp_path):
    path = _marked(tmp_path / "out", finished=True)
    old = snapshot(path)
    with pytest.raises(RuntimeError):
        with run_folder(path, "prune", overwrite=True) as folder:
            (path / "checkpoints").mkdir()
            (path / "checkpoints" / "latest").write_text("step_1")
            raise RuntimeError("disk full")
    aside = folder.replaces[0]
    assert snapshot(aside) == old
    with run_folder(path, "prune", resume=True) as again:
        assert again.resumed and again.replaces == [aside]
        (path / "report.json").write_text("{}")
    assert not aside.exists()


def test_a_failed_new_run_leaves_nothing_behind(tmp_path):
    with pytest.raises(ValueError):
        with run_folder(tmp_path / "out", "learn"):
            (tmp_path / "out" / "config.yaml").write_text("x")
            raise ValueError("bad data")
    assert not (tmp_path / "out").exists()


def test_resume_refuses_another_commands_run(tmp_path):
    path = _marked(tmp_path / "out", command="prune", results=True)
    with pytest.raises(OutputExistsError, match="holds a `compressor prune` run"):
        open_run_folder(path, "learn", resume=True)


def test_single_output_files_and_export_targets(tmp_path):
    existing = tmp_path / "report.json"
    existing.write_text("{}")
    with pytest.raises(OutputExistsError, match="already exists; pass --overwrite"):
        check_output_file(existing, overwrite=False)
    check_output_file(existing, overwrite=True)
    with pytest.raises(OutputExistsError, match="is the model.source"):
        check_output_file(existing, overwrite=True, inputs={"model.source": existing})
    user = tmp_path / "mine"
    user.mkdir()
    (user / "a.txt").write_text("a")
    with pytest.raises(OutputExistsError, match="did not create"):
        check_output_target(user, overwrite=True)
    ours = tmp_path / "export"
    ours.mkdir()
    write_marker(ours, "export")
    (ours / "model.safetensors").write_bytes(b"weights")
    with pytest.raises(OutputExistsError, match="pass --overwrite"):
        check_output_target(ours, overwrite=False)
    check_output_target(ours, overwrite=True)
