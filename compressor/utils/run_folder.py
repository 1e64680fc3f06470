"""One output-folder policy for every command: what a run may write into, replace or continue.

- A folder a command creates carries a marker (``.compressor-run.json``) from its first moment.
  ``--overwrite`` and ``--resume`` act only on marked folders; a folder of anyone else's files is
  refused, whatever the flags, and nothing in it is touched.
- An output that is, contains or lies inside one of the run's inputs (model, data, prior, logits,
  export source; symlinks resolved) is refused before anything is written.
- ``--overwrite`` never deletes first: the old run is moved aside (a hidden sibling) and removed only
  once the new run has finished; if the new run fails before writing any result, the old one is put
  back where it was.
- A run that fails (or is killed) before its first result leaves nothing that blocks the next try:
  a marked folder without results is reused as if new, whatever config it recorded.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Mapping, Optional

from compressor.errors import OutputExistsError
from compressor.utils.fs import atomic_write_text
from compressor.utils.logging import get_logger

log = get_logger(__name__)

MARKER = ".compressor-run.json"
MARKER_FORMAT = "compressor.run.v1"
DONE_MARKER = "report.json"  # written last by every run: its presence means finished
# what a run writes before its first result (plan.json: a copy of its sparsity plan, if it has one)
SETUP_FILES = frozenset({MARKER, "config.yaml", "plan.json"})


def _resolved(path: str | Path) -> Path:
    return Path(os.path.abspath(Path(path).expanduser().resolve()))


def nesting(output: str | Path, source: str | Path) -> Optional[str]:
    """How ``output`` overlaps ``source`` ("is", "lies inside", "contains"), or None (symlinks resolved)."""
    out, src = _resolved(output), _resolved(source)
    if out == src:
        return "is"
    if src in out.parents:
        return "lies inside"
    if out in src.parents:
        return "contains"
    return None


def check_apart_from_inputs(output: str | Path, inputs: Mapping[str, str | Path]) -> None:
    """Refuse an output that is, contains or lies inside an existing input; ``inputs``: what -> path."""
    for what, source in inputs.items():
        if source is None or not Path(source).expanduser().exists():
            continue  # a hub name, a builtin source, or a path the run will report as missing
        relation = nesting(output, source)
        if relation is not None:
            raise OutputExistsError(
                f"output {output} {relation} the {what} {source}; writing there could destroy the input. "
                "Choose an output folder outside every input"
            )


def read_marker(folder: Path) -> Optional[dict]:
    path = folder / MARKER
    if not path.is_file():
        return None
    try:
        marker = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) and marker.get("format") == MARKER_FORMAT else None


def write_marker(folder: Path, command: str, replaces: tuple[str, ...] = ()) -> dict:
    # nothing time- or host-dependent: an export stays byte-for-byte reproducible
    marker = {"format": MARKER_FORMAT, "command": command, "replaces": list(replaces)}
    atomic_write_text(folder / MARKER, json.dumps(marker, indent=2) + "\n")
    return marker


def _is_temporary(name: str) -> bool:
    return name.startswith(".") and name.endswith(".tmp")


def has_results(folder: Path) -> bool:
    """Whether a marked run folder holds anything beyond its set-up files and temporary files."""
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not _is_temporary(d)]
        top = Path(root) == folder
        if any(not _is_temporary(f) and not (top and f in SETUP_FILES) for f in files):
            return True
    return False


def _not_ours(folder: Path) -> OutputExistsError:
    return OutputExistsError(
        f"output folder {folder} holds files that compressor did not create (it has no {MARKER}), so it is "
        "not a run folder; nothing in it was changed. Choose a new --output (an empty or missing folder)"
    )


@dataclass
class RunFolder:
    """An output folder opened by ``open_run_folder``."""

    path: Path
    command: str
    resumed: bool  # an existing run with results, continued
    created: bool  # made (or emptied of set-up files) by this invocation
    replaces: list[Path] = field(default_factory=list)  # earlier runs moved aside, removed once this one finishes
    _restore: Optional[Path] = None  # the run moved aside by this invocation, put back if this one fails early

    @property
    def finished(self) -> bool:
        return (self.path / DONE_MARKER).is_file()

    def complete(self) -> None:
        """After the run finished: remove the runs it replaced."""
        for old in self.replaces:
            shutil.rmtree(old, ignore_errors=True)
        if self.replaces:
            log.info("removed the replaced run(s) %s", ", ".join(str(p) for p in self.replaces))
        self.replaces, self._restore = [], None

    def abandon(self) -> None:
        """After a failure: a new folder without results is removed again, and a replaced run put back."""
        if not self.created or has_results(self.path):
            if self.replaces:
                log.warning("the run that %s replaces is kept at %s until this one finishes (resume it with "
                            "--resume)", self.path, ", ".join(str(p) for p in self.replaces))
            return
        _remove_setup(self.path)
        if self._restore is not None and not self.path.exists():
            os.replace(self._restore, self.path)
            log.info("the new run failed before any result: %s is back as it was", self.path)


def _remove_setup(folder: Path) -> None:
    """Remove a run folder that holds nothing but set-up and temporary files."""
    shutil.rmtree(folder, ignore_errors=True)


def _move_aside(folder: Path) -> Path:
    aside = folder.with_name(f".{folder.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}")
    os.replace(folder, aside)
    return aside


def open_run_folder(output: str | Path, command: str, inputs: Optional[Mapping[str, str | Path]] = None,
                    overwrite: bool = False, resume: bool = False, resume_finished: bool = False) -> RunFolder:
    """Create, reuse, continue or replace the output folder of a ``command`` run, by the policy above.

    ``resume_finished``: ``--resume`` may also continue a finished run (training with more steps).
    """
    path = Path(output)
    check_apart_from_inputs(path, inputs or {})
    if path.exists() and not path.is_dir():
        raise OutputExistsError(f"output {path} is a file, not a folder; choose another --output")
    if not path.exists() or not any(path.iterdir()):
        if resume:
            log.info("nothing to resume in %s: starting a new run", path)
        return _fresh(path, command)
    marker = read_marker(path)
    if marker is None:
        raise _not_ours(path)
    replaces = [path.parent / p for p in marker.get("replaces", []) if (path.parent / p).exists()]
    if not has_results(path):  # set up, then failed or killed before any result: nothing to keep
        if replaces:  # an overwrite killed before its first result: as if it never happened
            _remove_setup(path)
            os.replace(replaces[0], path)
            log.info("%s: put back the run that an interrupted --overwrite had moved aside", path)
            return open_run_folder(path, command, inputs, overwrite, resume, resume_finished)
        return _fresh(path, command)
    finished = (path / DONE_MARKER).is_file()
    if overwrite:
        aside = _move_aside(path)
        folder = _fresh(path, command, [aside, *replaces])
        folder._restore = aside
        log.info("replacing the run in %s: the old one waits at %s until the new one finishes", path, aside)
        return folder
    if resume and (not finished or resume_finished):
        if marker.get("command") != command:
            raise OutputExistsError(f"{path} holds a `compressor {marker.get('command')}` run; it cannot be "
                                    f"resumed by `compressor {command}`. Choose another --output")
        return RunFolder(path, command, resumed=True, created=False, replaces=replaces)
    if finished:
        raise OutputExistsError(f"output folder {path} already holds a finished run; pass --overwrite to replace it "
                                "or choose another --output")
    raise OutputExistsError(f"output folder {path} holds an unfinished run; pass --resume to continue it, "
                            "--overwrite to start over, or choose another --output")


def _fresh(path: Path, command: str, replaces: Optional[list[Path]] = None) -> RunFolder:
    replaces = replaces or []
    path.mkdir(parents=True, exist_ok=True)
    for name in SETUP_FILES - {MARKER}:
        (path / name).unlink(missing_ok=True)
    write_marker(path, command, tuple(p.name for p in replaces))
    return RunFolder(path, command, resumed=False, created=True, replaces=replaces)


@contextmanager
def run_folder(output: str | Path, command: str, inputs: Optional[Mapping[str, str | Path]] = None,
               overwrite: bool = False,
               resume: bool = False, resume_finished: bool = False) -> Iterator[RunFolder]:
    """``open_run_folder`` for the duration of a run: ``complete`` after success, ``abandon`` after a failure."""
    folder = open_run_folder(output, command, inputs, overwrite, resume, resume_finished)
    try:
        yield folder
    except BaseException:
        folder.abandon()
        raise
    if folder.finished:
        folder.complete()


def check_output_file(path: str | Path, overwrite: bool, inputs: Optional[Mapping[str, str | Path]] = None) -> Path:
    """A single output file (e.g. `compressor eval --output`): never an input, replaced only if asked."""
    path = Path(path)
    check_apart_from_inputs(path, inputs or {})
    if path.is_dir():
        raise OutputExistsError(f"output {path} is a folder; give a file name")
    if path.exists() and not overwrite:
        raise OutputExistsError(f"output file {path} already exists; pass --overwrite to replace it or choose another name")
    return path


def check_output_target(path: str | Path, overwrite: bool, inputs: Optional[Mapping[str, str | Path]] = None) -> Path:
    """A folder written whole and renamed into place at the end (an export): may it replace ``path``?"""
    path = Path(path)
    check_apart_from_inputs(path, inputs or {})
    if path.exists() and not path.is_dir():
        raise OutputExistsError(f"output {path} is a file, not a folder; choose another output")
    if path.is_dir() and any(path.iterdir()):
        if read_marker(path) is None:
            raise _not_ours(path)
        if not overwrite:
            raise OutputExistsError(f"{path} already exists; pass --overwrite to replace it or choose another path")
    return path
