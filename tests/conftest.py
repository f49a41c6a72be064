import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
GOLDEN = SHARED / "golden"


@pytest.fixture(scope="session")
def golden_dir():
    assert GOLDEN.is_dir(), f"golden vectors not found at {GOLDEN}: ../shared must sit beside the repo"
    return GOLDEN
