from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

REPO = Path(__file__).resolve().parents[1]
TESTDATA = Path(os.environ.get("VKR_TESTDATA", REPO.parent / "shared" / "testdata" / "videos"))


@pytest.fixture
def testdata() -> Path:
    if not TESTDATA.is_dir():
        pytest.fail(f"test videos not found at {TESTDATA}; set VKR_TESTDATA")
    return TESTDATA
