from __future__ import annotations

import os
from pathlib import Path

import pytest
from videos import video_dir

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")


@pytest.fixture(scope="session")
def testdata() -> Path:
    """The folder of test videos made by tests/videos.py (cached under .pytest_cache)."""
    return video_dir()
