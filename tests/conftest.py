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


@pytest.fixture(scope="session")
def smollm_dir() -> Path:
    from tests.factories import smollm_folder

    return smollm_folder()


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, smollm_dir) -> Path:
    from tests.factories import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny-llama"))
