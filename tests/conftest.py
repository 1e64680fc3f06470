import os
from pathlib import Path

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data" / "wikitext-2"


@pytest.fixture(scope="session")
def wikitext_dir() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.fail(f"benchmark data not found at {SHARED_DATA}: the tests expect ../shared beside the checkout")
    return SHARED_DATA


@pytest.fixture
def text_file(tmp_path, wikitext_dir) -> Path:
    """The first 60,000 characters of the calibration text: enough windows for tiny-model runs."""
    path = tmp_path / "text.txt"
    path.write_text((wikitext_dir / "wiki.valid.tokens").read_text()[:60_000])
    return path


@pytest.fixture(scope="session")
def smollm_dir() -> Path:
    from tests.factories import smollm_folder

    return smollm_folder()


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, smollm_dir) -> Path:
    from tests.factories import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tmp_path_factory, smollm_dir) -> Path:
    from tests.factories import make_tiny_qwen2

    return make_tiny_qwen2(tmp_path_factory.mktemp("tiny-qwen2"))


@pytest.fixture
def two_nodes():
    """A Ray cluster of two nodes on this machine (head: 2 CPUs, node 1: 1 CPU), stopped by PID afterwards.

    The nodes inherit this process's environment (PYTHONPATH), so their workers import this checkout.
    """
    import ray

    from compressor.execution.local_cluster import LocalCluster

    with LocalCluster([2, 1]) as cluster:
        try:
            yield cluster
        finally:
            if ray.is_initialized():  # a driver joined by the test would stay connected to a dead cluster
                ray.shutdown()
