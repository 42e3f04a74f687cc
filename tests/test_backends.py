"""The run's seams: checkpointer, call cache and executor are backends chosen by config.

A plugin registers other backends through ``vkr_register_backends`` (the way a PostgreSQL
cache or a Ray executor will) and a run uses them without any step or pipeline knowing:
the same videos give the same accepted examples, and nothing lands in the embedded stores.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import types
from pathlib import Path
from typing import Any

import pytest

from vkr_core.backends import CallCacheBackend, ExecutorBackend
from vkr_core.config import RunConfig
from vkr_core.hookspecs import hookimpl
from vkr_core.plugins import PluginError, get_plugin_manager
from vkr_core.run import run_items
from vkr_core.schemas import Video


class DictCache:
    """A call cache in a dict: what a shared cache service must offer the caller."""

    def __init__(self) -> None:
        self.data: dict[str, Any] = {}
        self.transactions = 0

    def get(self, key: str, default: Any = None) -> Any:
        return self.data.get(key, default)

    def set(self, key: str, value: Any) -> bool:
        self.data[key] = value
        return True

    def delete(self, key: str) -> bool:
        return self.data.pop(key, None) is not None

    @contextlib.contextmanager
    def transact(self) -> Any:
        self.transactions += 1
        yield

    def close(self) -> None:
        pass


class DictCacheBackend(CallCacheBackend):
    name = "dict"

    def __init__(self) -> None:
        self.opened: list[DictCache] = []

    def open(self, store: Any) -> DictCache:
        cache = DictCache()
        self.opened.append(cache)
        return cache


class OneAtATime(ExecutorBackend):
    """An executor that runs items strictly one after another, noting their order."""

    name = "one-at-a-time"

    def __init__(self) -> None:
        self.order: list[str] = []

    async def run(self, process, items, counters, **options: Any) -> Any:
        for item in items:
            self.order.append(item.video_id)
            counters.launched += 1
            counters.on_video(await process(item))
        return counters


def videos(folder: Path, testdata: Path, n: int) -> list[Video]:
    out = []
    for i in range(n):
        target = folder / f"clip{i}.mkv"
        shutil.copy(testdata / "flipping_a_pancake.mkv", target)
        out.append(Video(video_id=f"clip{i}", path=str(target), discipline="cooking"))
    return out


def accepted_by_video(run_dir: Path) -> dict[str, list[str]]:
    import json

    result = {}
    for path in sorted((run_dir / "records").glob("*.json")):
        record = json.loads(path.read_text())
        result[record["video_id"]] = sorted(e["question"] for e in record["accepted"])
    return result


def test_plugged_in_backends_give_the_same_results_as_the_embedded_ones(
    tmp_path, testdata, vkr_pool, vkr_fake_server
):
    cache_backend, executor = DictCacheBackend(), OneAtATime()
    plugin = types.SimpleNamespace(
        vkr_register_backends=hookimpl(
            lambda register: [register(cache_backend), register(executor)]
        )
    )
    pm = get_plugin_manager(extra_plugins=[plugin], load_entry_points=False)
    folder = tmp_path / "videos"
    folder.mkdir()
    items = videos(folder, testdata, 3)

    embedded = tmp_path / "embedded"
    asyncio.run(run_items(items, embedded, vkr_pool, RunConfig(), pm, progress=False))
    paid = vkr_fake_server.stats()["completions"]

    plugged = tmp_path / "plugged"
    config = RunConfig(call_cache="dict", executor="one-at-a-time", checkpointer="memory")
    counters = asyncio.run(run_items(items, plugged, vkr_pool, config, pm, progress=False))

    assert counters.done == 3 and executor.order == ["clip0", "clip1", "clip2"]
    assert any(accepted_by_video(embedded).values())
    assert accepted_by_video(plugged) == accepted_by_video(embedded)
    # Every reply of the plugged run went into (and only into) the plugged cache.
    [cache] = cache_backend.opened
    replies = vkr_fake_server.stats()["completions"] - paid
    assert replies > 0 and len(cache.data) == replies and cache.transactions == replies
    assert not (plugged / "cache").exists()
    assert not list(plugged.glob("checkpoints.sqlite*"))


def test_an_unknown_backend_is_refused_before_the_run_directory_is_touched(
    tmp_path, testdata, vkr_pool, vkr_plugin_manager
):
    folder = tmp_path / "videos"
    folder.mkdir()
    # Ray is a loaded executor now (plugins/backends/ray_engine.py): name one that is not.
    config = RunConfig(executor="dask")
    with pytest.raises(PluginError, match=r"no backend named 'executor:dask' is loaded \(loaded: "):
        asyncio.run(
            run_items(
                videos(folder, testdata, 1),
                tmp_path / "run",
                vkr_pool,
                config,
                vkr_plugin_manager,
                progress=False,
            )
        )
    assert not (tmp_path / "run").exists()
