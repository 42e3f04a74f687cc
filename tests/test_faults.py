"""Fault suite against the scripted server: what a provider throws at a long run."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import pytest
import yaml

from plugins.providers.fake_server import FakeModelServer, write_pool
from vkr_core.config import RunConfig
from vkr_core.plugins import get_plugin_manager
from vkr_core.run import run_items
from vkr_core.schemas import Video
from vkr_core.store import RunStore


def copy_videos(folder: Path, testdata: Path) -> list[Video]:
    folder.mkdir()
    out = []
    for i in range(3):
        path = folder / f"clip{i}.mkv"
        shutil.copy(testdata / "flipping_a_pancake.mkv", path)
        out.append(
            Video(video_id=f"clip{i}", path=str(path), discipline="cooking", title=f"clip {i}")
        )
    return out


@pytest.fixture
def videos(tmp_path: Path, testdata: Path) -> list[Video]:
    return copy_videos(tmp_path / "videos", testdata)


def run(videos, run_dir, pool, pm, concurrency=3):
    counters = asyncio.run(
        run_items(videos, run_dir, pool, RunConfig(), pm, concurrency=concurrency, progress=False)
    )
    # A run keeps counters, not records: the records are read back from the run directory.
    return RunStore(run_dir).records(), counters


def outcome(records):
    accepted = sorted((e.problem_id, e.solution, e.think) for r in records for e in r.accepted)
    rejected = sorted((x.example_id, x.step, x.kind) for r in records for x in r.rejected)
    return accepted, rejected


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, testdata: Path):
    """What a run without faults makes of the same videos: made once for the module, with a
    server of its own (the replies depend on the seed and the request, not on the server)."""
    root = tmp_path_factory.mktemp("reference")
    videos = copy_videos(root / "videos", testdata)
    pm = get_plugin_manager()
    with FakeModelServer(seed=0) as server:
        pool = write_pool(root / "pool.yaml", server.base_url, registry_path=root / "e.yaml", pm=pm)
        records, _ = run(videos, root / "run", pool, pm)
    return outcome(records)


@pytest.mark.parametrize(
    "faults",
    [
        {"rate_limit": 0.5, "retry_after_s": 0.02},
        {"server_error": 0.3},
        {"script": ["429", "429", "429", "500", "503"], "retry_after_s": 0.01},
    ],
    ids=["429-storm", "5xx", "scripted-burst"],
)
def test_transport_faults_change_nothing_but_the_retry_count(
    faults, videos, tmp_path, vkr_pool, vkr_fake_server, vkr_plugin_manager, reference
):
    vkr_fake_server.set_policy(faults)
    records, counters = run(videos, tmp_path / "faulty", vkr_pool, vkr_plugin_manager)
    assert all(r.status == "done" for r in records)
    assert outcome(records) == reference
    stats = vkr_fake_server.stats()
    assert sum(stats["faults"].values()) > 0
    assert stats["repeats"] == 0 and stats["completions"] == counters.paid_calls


def test_429_storm_shrinks_the_models_concurrency_and_honours_retry_after(
    videos, tmp_path, vkr_pool, vkr_fake_server, vkr_plugin_manager
):
    from vkr_core.run import Run

    vkr_fake_server.set_policy({"rate_limit": 0.5, "retry_after_s": 0.1})

    async def go():
        async with Run(tmp_path / "run", vkr_pool, RunConfig(), vkr_plugin_manager) as r:
            started = asyncio.get_running_loop().time()
            await asyncio.gather(*(r.process(v) for v in videos))
            return r.caller.limiters, asyncio.get_running_loop().time() - started

    limiters, elapsed = asyncio.run(go())
    limited = [lim for lim in limiters.values() if lim.rate_limited]
    assert limited and all(lim.limit < lim.max_concurrency for lim in limited)
    # Every 429 paused its model for Retry-After: a burst cannot finish faster than that.
    assert elapsed >= 0.1


def test_timeouts_are_retried(
    videos, tmp_path, vkr_pool, vkr_fake_server, vkr_plugin_manager, reference
):
    pool = yaml.safe_load(vkr_pool.read_text())
    for model in pool["models"]:
        model["timeout"] = 1.0
    pool_path = vkr_pool.parent / "pool-timeout.yaml"
    pool_path.write_text(yaml.safe_dump(pool))
    vkr_fake_server.set_policy({"script": ["hang", "hang"], "hang_s": 30})
    records, _ = run(videos, tmp_path / "slow", pool_path, vkr_plugin_manager)
    assert outcome(records) == reference
    assert vkr_fake_server.stats()["faults"].get("hang", 0) >= 1


def test_a_malformed_reply_is_one_rejection_with_its_raw_text_and_the_run_goes_on(
    videos, tmp_path, vkr_pool, vkr_fake_server, vkr_plugin_manager
):
    vkr_fake_server.set_policy(
        {"model_steps": {"fake-a|example_generation": {"script": ["malformed"]}}}
    )
    records, _ = run(videos, tmp_path / "run", vkr_pool, vkr_plugin_manager, concurrency=1)
    malformed = [x for r in records for x in r.rejected if x.kind == "malformed"]
    assert (
        len(malformed) == 1 and malformed[0].raw_reply and malformed[0].step == "example_generation"
    )
    assert sum(r.generated for r in records) == 17


def test_refusals_are_terminal_never_retried_never_cached(
    videos, tmp_path, vkr_pool, vkr_fake_server, vkr_plugin_manager
):
    vkr_fake_server.set_policy({"steps": {"self_consistency": {"refusal": 1.0}}})
    records, _ = run(videos, tmp_path / "run", vkr_pool, vkr_plugin_manager)
    refused = [x for r in records for x in r.rejected if x.kind == "refusal"]
    assert len(refused) == 18 and all(x.step == "self_consistency" for x in refused)
    stats = vkr_fake_server.stats()
    assert stats["faults"]["refusal"] == 18 and stats["by_step"]["self_consistency"] == 18
    # A fresh run sharing the cache replays generation but asks again where it was refused.
    shutil.copytree(tmp_path / "run" / "cache", tmp_path / "again" / "cache")
    vkr_fake_server.reset_stats()
    run(videos, tmp_path / "again", vkr_pool, vkr_plugin_manager)
    assert vkr_fake_server.stats()["by_step"] == {"self_consistency": 18}
