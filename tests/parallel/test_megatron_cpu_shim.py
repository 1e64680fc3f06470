"""The megatron CPU shim knows which megatron-core release it was written for."""

from __future__ import annotations

import pytest

from compressor.parallel import megatron_cpu_shim as shim


def test_the_release_it_was_written_for_is_accepted_silently(recwarn):
    shim.check_version(".".join(map(str, shim.WRITTEN_FOR)))
    assert not recwarn.list


def test_another_patch_release_warns():
    major, minor, patch = shim.WRITTEN_FOR
    with pytest.warns(RuntimeWarning, match=f"written for megatron-core {major}.{minor}.{patch}"):
        shim.check_version(f"{major}.{minor}.{patch + 1}")


def test_another_minor_release_raises_with_the_fix(monkeypatch):
    major, minor, _ = shim.WRITTEN_FOR
    monkeypatch.delenv(shim.FORCE_ENV, raising=False)
    with pytest.raises(shim.MegatronShimError, match=r"Install megatron-core==.*COMPRESSOR_MEGATRON_SHIM_FORCE=1"):
        shim.check_version(f"{major}.{minor + 1}.0")
    monkeypatch.setenv(shim.FORCE_ENV, "1")
    with pytest.warns(RuntimeWarning, match="trying anyway"):
        shim.check_version(f"{major}.{minor + 1}.0")


def test_installed_megatron_is_the_supported_release():
    megatron = pytest.importorskip("megatron.core.package_info")
    assert megatron.__version__ == ".".join(map(str, shim.WRITTEN_FOR))  # the pin in setup.cfg and the shim agree
