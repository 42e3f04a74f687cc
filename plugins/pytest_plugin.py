"""pytest fixtures for vkr and for plugin authors: a scripted model server and a pool for it.

Installed with vkr (entry point ``pytest11``), so a third-party plugin's tests get the same
fixtures we use: ``vkr_fake_server``, ``vkr_pool`` and ``vkr_plugin_manager``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")


@pytest.fixture
def vkr_plugin_manager() -> Any:
    """A plugin manager with built-ins and installed plugins loaded."""
    from vkr_core.plugins import get_plugin_manager

    return get_plugin_manager()


@pytest.fixture
def vkr_fake_server() -> Iterator[Any]:
    """A scripted OpenAI-compatible server on 127.0.0.1; ``.base_url``, ``.stats()``, ``.set_policy()``."""
    from plugins.providers.fake_server import FakeModelServer

    server = FakeModelServer(seed=0)
    server.base_url = server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def vkr_pool(tmp_path: Path, vkr_fake_server: Any, vkr_plugin_manager: Any) -> Path:
    """A pool file (and eligibility registry) pointing at ``vkr_fake_server``."""
    from plugins.providers.fake_server import write_pool

    return Path(
        write_pool(
            tmp_path / "pool.yaml",
            vkr_fake_server.base_url,
            registry_path=tmp_path / "eligibility.yaml",
            pm=vkr_plugin_manager,
        )
    )


# The key the loopback moderation servers accept (a test sets it in the environment).
FAKE_MODERATION_KEY = "vkr-fake-moderation-key-0123456789"


@pytest.fixture
def vkr_fake_azure_content_safety() -> Iterator[Any]:
    """Azure AI Content Safety ``image:analyze`` on 127.0.0.1; ``.url`` is the endpoint,
    ``.api_key`` the key it accepts, ``.mark(sha256, scores)``, ``.script([...])``, ``.requests``."""
    from plugins.providers.fake_moderation import FakeAzureContentSafety

    server = FakeAzureContentSafety(api_key=FAKE_MODERATION_KEY)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def vkr_fake_openai_moderation() -> Iterator[Any]:
    """OpenAI ``/v1/moderations`` on 127.0.0.1; ``.url`` is the API base, as for Azure's."""
    from plugins.providers.fake_moderation import FakeOpenAIModeration

    server = FakeOpenAIModeration(api_key=FAKE_MODERATION_KEY)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def vkr_youtube_server() -> Iterator[Any]:
    """A loopback YouTube Data API v3 server (and mp4 files for yt-dlp); ``.base_url``,
    ``.file_url_template``, ``.api_key``, ``.add_videos()``, ``.fail_next()``, counts."""
    from plugins.providers.fake_youtube import FakeYouTubeServer

    server = FakeYouTubeServer()
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def vkr_postgres_server() -> Iterator[str]:
    """A PostgreSQL server's superuser URL: ``$VKR_TEST_POSTGRES_URL``, else a throwaway
    cluster started from ``initdb``/``pg_ctl`` (as the ``postgres`` user when root). Without
    either the test fails, saying how to get PostgreSQL: it never skips."""
    from plugins.backends.postgres_server import PostgresUnavailable, ThrowawayPostgres

    given = os.environ.get("VKR_TEST_POSTGRES_URL")
    if given:
        yield given
        return
    try:
        server = ThrowawayPostgres()
        url = server.start()
    except PostgresUnavailable as exc:
        pytest.fail(str(exc), pytrace=False)
    try:
        yield url
    finally:
        server.stop()


@pytest.fixture
def vkr_postgres_url(vkr_postgres_server: str) -> Iterator[str]:
    """A fresh database of its own for one test (URL with its password), dropped after."""
    from plugins.backends.postgres_server import create_database, drop_database

    url = create_database(vkr_postgres_server)
    try:
        yield url
    finally:
        drop_database(vkr_postgres_server, url)
