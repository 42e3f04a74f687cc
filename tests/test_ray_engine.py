"""`vkr run --engine ray`: the same run on a real local Ray (two CPUs) as on the local engine.

One Ray for the whole session (``ray.init(num_cpus=2)``), no mocks: the workers are Ray
actors in their own processes, calling the scripted model server on 127.0.0.1 through the
real provider, writing to the same run directory. A subclass of the fake server counts the
requests in flight per model, to see that a pool's ``max_concurrency`` holds across workers.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner
from test_run import VKR, accepted, keys_vkr_holds, write_manifest

from cli import cli
from plugins.providers.fake_server import FakeModelServer, write_pool
from vkr_core.config import RunConfig
from vkr_core.plugins import get_plugin_manager
from vkr_core.run import run_items

pytestmark = pytest.mark.slow

# The acceptance manifest: 40 videos (~25 s through Ray, ~35 s locally, here).
VIDEOS = 40
# A worker killed mid-run needs only enough videos that it holds some when it dies: the first
# 12 of the same manifest, whose accepted examples are those of the 40-video reference.
KILL_VIDEOS = 12
ROUNDS = 6  # 3 skills x 2 rounds


@pytest.fixture(scope="session")
def ray_cluster() -> Any:
    import ray  # the dev extra installs it: a missing ray fails here, never skips

    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False)
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def server() -> Any:
    with FakeModelServer(seed=0) as fake_server:
        yield fake_server


@pytest.fixture(scope="module")
def pm() -> Any:
    return get_plugin_manager()


@pytest.fixture(scope="module")
def pool(tmp_path_factory, server, pm) -> Path:
    folder = tmp_path_factory.mktemp("pool")
    return write_pool(
        folder / "pool.yaml", server.base_url, registry_path=folder / "el.yaml", pm=pm
    )


@pytest.fixture(scope="module")
def manifest(tmp_path_factory, testdata) -> Path:
    return write_manifest(tmp_path_factory.mktemp("videos"), testdata, good=VIDEOS, bad=False)


def run(
    pm: Any, manifest: Path, pool: Path, out: Path, engine: str, concurrency: int = 8, **options
) -> Any:
    pipeline = pm.registry.get("pipeline", "generation")
    loaded = pipeline.read_items(manifest, RunConfig())
    config = RunConfig(executor=engine, executor_options=options, **loaded.settings)
    return run_items(loaded.items, out, pool, config, pm, concurrency=concurrency, progress=False)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, pm, manifest, pool, server) -> dict[str, Any]:
    """The accepted examples of the manifest through the local engine."""
    server.set_policy({"latency_ms": 100})
    out = tmp_path_factory.mktemp("local")
    counters = asyncio.run(run(pm, manifest, pool, out, "local"))
    assert counters.done == VIDEOS and counters.failed == 0
    return accepted(out)


def of_videos(examples: dict[str, Any], videos: int) -> dict[str, Any]:
    """The examples of good0 .. good<videos - 1> (problem ids are ``video-skill-round``)."""
    ids = {f"good{i}" for i in range(videos)}
    return {pid: example for pid, example in examples.items() if pid.rsplit("-", 2)[0] in ids}


def all_done(run_dir: Path) -> list[str]:
    records = [json.loads(p.read_text()) for p in sorted((run_dir / "records").glob("*.json"))]
    for record in records:
        outcomes = len(record["accepted"]) + len(record["rejected"])
        assert record["status"] == "done" and outcomes == ROUNDS, record["video_id"]
    return [record["video_id"] for record in records]


async def test_two_ray_workers_accept_what_the_local_engine_accepts(
    ray_cluster, tmp_path, pm, manifest, pool, server, reference
):
    server.set_policy({"latency_ms": 100})
    server.reset_stats()
    counters = await run(pm, manifest, pool, tmp_path / "ray", "ray", workers=2)
    assert counters.done == VIDEOS and counters.failed == 0
    assert accepted(tmp_path / "ray") == reference and reference
    assert len(all_done(tmp_path / "ray")) == VIDEOS
    stats = server.stats()
    assert stats["repeats"] == 0
    # The driver's counters heard every worker's calls: what the end of the run prints.
    assert counters.paid_calls == stats["completions"]
    calls = [json.loads(line) for line in (tmp_path / "ray" / "calls.jsonl").open()]
    assert len(calls) == stats["completions"]


def paid_twice(run_dir: Path) -> Counter[str]:
    paid = Counter(
        call["cache_key"]
        for call in map(json.loads, (run_dir / "calls.jsonl").open())
        if not call["cache_hit"] and call["outcome"] != "error"
    )
    return Counter({key: n for key, n in paid.items() if n > 1})


async def test_a_killed_worker_hands_its_videos_on_and_nothing_is_paid_twice(
    ray_cluster, tmp_path, testdata, pm, pool, server, reference
):
    manifest = write_manifest(tmp_path / "videos", testdata, good=KILL_VIDEOS, bad=False)
    server.set_policy({"latency_ms": 100})
    server.reset_stats()
    out = tmp_path / "killed"
    held: set[str] = set()
    killed: list[int] = []

    async def kill_a_worker() -> None:
        # About a fifth of the run's calls: each worker is mid-way through its videos.
        while server.stats()["completions"] < 60:
            await asyncio.sleep(0.05)
        names = [
            a["name"]
            for a in ray_cluster.util.list_named_actors(all_namespaces=True)
            if "-w0." in a["name"]
        ]
        assert names, "no worker to kill"
        pid = await ray_cluster.get_actor(names[0]).pid.remote()
        os.kill(pid, signal.SIGKILL)
        killed.append(pid)
        await asyncio.sleep(0.5)  # the worker is gone: what vkr holds now is final for it
        held.update(keys_vkr_holds(out))

    killer = asyncio.create_task(kill_a_worker())
    counters = await run(pm, manifest, pool, out, "ray", workers=2)
    await killer
    assert killed, "the run ended before the kill"
    # Every video done once: none lost with the worker, none counted twice.
    assert counters.done == KILL_VIDEOS and counters.failed == 0
    assert sorted(all_done(out)) == sorted(f"good{i}" for i in range(KILL_VIDEOS))
    assert accepted(out) == of_videos(reference, KILL_VIDEOS) != {}
    stats = server.stats()
    repaid = set(stats["repeated_call_keys"]) & held
    assert not repaid, f"{len(repaid)} reply(ies) vkr had received were paid again"
    # Only replies still on the wire when the worker died can be paid again: at most the
    # killed worker's requests in flight (4 models at max_concurrency 8).
    assert stats["repeats"] <= 32
    assert set(paid_twice(out)) <= set(stats["repeated_call_keys"])


async def test_max_concurrency_holds_across_the_cluster(
    ray_cluster, tmp_path, pm, testdata, server
):
    data = yaml.safe_load(
        Path(write_pool(tmp_path / "pool.yaml", server.base_url, pm=pm)).read_text()
    )
    for model in data["models"]:
        model["max_concurrency"] = 2
    pool = tmp_path / "pool.yaml"
    pool.write_text(yaml.safe_dump(data))
    manifest = write_manifest(tmp_path / "videos", testdata, good=6, bad=False)
    server.set_policy({"latency_ms": 150})
    server.reset_stats()  # and with it each model's peak of requests in flight
    # 2 workers x 4 videos each: without a cluster-wide limit each worker would send 2.
    counters = await run(pm, manifest, pool, tmp_path / "out", "ray", concurrency=8, workers=2)
    assert counters.done == 6
    peaks = server.stats()["peak_in_flight"]
    assert peaks and max(peaks.values()) == 2, peaks


async def test_a_worker_stops_at_the_runs_limit_when_the_others_spent_it(ray_cluster):
    """--max-spend counts every worker's calls: a worker that paid little itself sends
    nothing more once the run as a whole reached the limit."""
    from plugins.backends.ray_engine import ClusterLimits, ClusterSpend

    actor = ray_cluster.remote(num_cpus=0)(ClusterLimits).remote({}, 0.25)  # paid before
    first, second = ClusterSpend(0.8, 0.25, actor), ClusterSpend(0.8, 0.25, actor)
    first.add(0.5)
    async with asyncio.timeout(30):  # the actor takes calls in no set order
        while await actor.spend.remote(0.0) < 0.75:  # the run has paid 0.75 of 0.8
            await asyncio.sleep(0.01)
    assert not second.reached  # the second worker has not heard it yet
    second.add(0.125)  # it paid 0.125 itself; the actor's reply carries the rest
    await asyncio.wait_for(second.wait(), timeout=30)
    assert second.reached and second.spent_usd == 0.875
    ray_cluster.kill(actor)


async def test_max_spend_stops_a_ray_run_and_a_rerun_without_it_finishes(
    ray_cluster, tmp_path, pm, pool, server, testdata
):
    manifest = write_manifest(tmp_path / "videos", testdata, good=8, bad=False)
    pipeline = pm.registry.get("pipeline", "generation")
    loaded = pipeline.read_items(manifest, RunConfig())
    server.set_policy({"latency_ms": 100})
    server.reset_stats()
    limit = 0.02  # about two of eight videos at the fake server's prices
    out = tmp_path / "out"
    config = RunConfig(
        executor="ray", executor_options={"workers": 2}, max_spend=limit, **loaded.settings
    )
    counters = await run_items(loaded.items, out, pool, config, pm, concurrency=4, progress=False)
    assert counters.stopped == "budget" and counters.done < 8
    paid = [c for c in map(json.loads, (out / "calls.jsonl").open()) if not c["cache_hit"]]
    spent = sum(c["cost_usd"] for c in paid)
    # Past the limit, only the calls in flight when it was reached: at most 4 videos at once,
    # each with its 6 rounds' calls (2 at video_dependency) out.
    in_flight = 4 * ROUNDS * 2 * max(c["cost_usd"] for c in paid)
    assert limit <= spent <= limit + in_flight, (spent, in_flight)
    config = RunConfig(executor="ray", executor_options={"workers": 2}, **loaded.settings)
    counters = await run_items(loaded.items, out, pool, config, pm, concurrency=4, progress=False)
    assert counters.stopped is None and len(all_done(out)) == 8
    assert server.stats()["repeats"] == 0


def vkr(*args: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run([VKR, *args], capture_output=True, text=True, **kwargs)


def test_vkr_run_engine_ray_joins_an_existing_cluster(ray_cluster, tmp_path, testdata, server, pm):
    pool = write_pool(tmp_path / "pool.yaml", server.base_url, pm=pm)
    manifest = write_manifest(tmp_path / "videos", testdata, good=3, bad=False)
    server.set_policy({"latency_ms": 50})
    address = ray_cluster.get_runtime_context().gcs_address
    out = tmp_path / "out"
    result = vkr(
        "run", "--videos", str(manifest), "--pool", str(pool), "--out", str(out),
        "--no-progress", "--engine", "ray", "--ray-address", address, "--workers", "2",
        "--concurrency", "2",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert len(all_done(out)) == 3
    report = CliRunner().invoke(cli, ["report", str(out)])  # in this process: only its output
    assert report.exit_code == 0, report.output


def test_engine_options_say_what_is_wrong_in_one_line(tmp_path, testdata, server, pm):
    pool = write_pool(tmp_path / "pool.yaml", server.base_url, pm=pm)
    manifest = write_manifest(tmp_path / "videos", testdata, good=1, bad=False)
    base = ["run", "--videos", str(manifest), "--pool", str(pool), "--out", str(tmp_path / "o")]
    # Usage errors in this process: what they print, not how a process starts, is the point.
    result = CliRunner().invoke(cli, [*base, "--workers", "2"])
    assert result.exit_code == 2 and "--workers needs --engine ray" in result.stderr
    result = CliRunner().invoke(
        cli, [*base, "--engine", "ray", "--workers", "3", "--concurrency", "2"]
    )
    assert result.exit_code == 2
    assert "--workers 3 is more than --concurrency 2" in result.stderr
    # Without Ray installed: how to get it, in one line, before the run directory is made.
    blocked = (
        "import sys; sys.modules['ray'] = None; sys.argv[0] = 'vkr'; from cli import main; main()"
    )
    result = subprocess.run(
        [sys.executable, "-c", blocked, *base, "--engine", "ray"], capture_output=True, text=True
    )
    assert result.returncode == 1
    assert "pip install 'vkr[ray]'" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "o").exists()


async def test_ray_workers_share_postgresql_state_and_a_killed_worker_loses_nothing(
    ray_cluster, tmp_path, pm, testdata, pool, server, vkr_postgres_url, monkeypatch
):
    # Short leases: the killed worker's claims expire in seconds, then another takes them.
    monkeypatch.setenv("VKR_STATE_LEASE", "3")
    manifest = write_manifest(tmp_path / "videos", testdata, good=8, bad=False)
    server.set_policy({"latency_ms": 200})
    server.reset_stats()
    pipeline = pm.registry.get("pipeline", "generation")
    loaded = pipeline.read_items(manifest, RunConfig())
    config = RunConfig(
        executor="ray",
        executor_options={"workers": 2},
        state=vkr_postgres_url,
        **loaded.settings,
    )
    out = tmp_path / "out"
    killed: list[int] = []

    async def kill_a_worker() -> None:
        while server.stats()["completions"] < 40:
            await asyncio.sleep(0.05)
        names = [
            a["name"]
            for a in ray_cluster.util.list_named_actors(all_namespaces=True)
            if "-w1." in a["name"]
        ]
        pid = await ray_cluster.get_actor(names[0]).pid.remote()
        os.kill(pid, signal.SIGKILL)
        killed.append(pid)

    killer = asyncio.create_task(kill_a_worker())
    counters = await run_items(loaded.items, out, pool, config, pm, concurrency=4, progress=False)
    await killer
    assert killed
    assert counters.done == 8 and counters.failed == 0
    assert len(all_done(out)) == 8
    assert not (out / "cache").exists() and not (out / "checkpoints.sqlite").exists()
    stats = server.stats()
    assert stats["repeats"] <= 32
    assert set(paid_twice(out)) <= set(stats["repeated_call_keys"])
    # The password reached the workers without reaching a file.
    password = vkr_postgres_url.split(":")[2].split("@")[0]
    for path in out.rglob("*"):
        if path.is_file():
            assert password.encode() not in path.read_bytes(), path


async def test_any_registered_pipeline_runs_on_ray_as_it_does_locally(
    ray_cluster, tmp_path, pm, pool, server
):
    # The knowledge bank build: a text pipeline whose items are lectures, not videos.
    bank = tmp_path / "bank.yaml"
    subprocess.run([VKR, "bank", "example", str(bank)], check=True, capture_output=True)
    server.set_policy({"latency_ms": 50})
    pipeline = pm.registry.get("pipeline", "bank")
    loaded = pipeline.read_items(bank, RunConfig())
    records = {}
    for engine, options in (("local", {}), ("ray", {"workers": 2})):
        config = RunConfig(pipeline="bank", executor=engine, executor_options=options)
        out = tmp_path / engine
        counters = await run_items(
            loaded.items, out, pool, config, pm, concurrency=4, progress=False
        )
        assert counters.done == len(loaded.items) > 1
        records[engine] = {p.name: p.read_text() for p in (out / "records").iterdir()}
    assert records["ray"] == records["local"]


def test_a_killed_driver_leaves_no_worker_and_the_rerun_pays_nothing_twice(
    ray_cluster, tmp_path, testdata, server, pm
):
    pool = write_pool(tmp_path / "pool.yaml", server.base_url, pm=pm)
    manifest = write_manifest(tmp_path / "videos", testdata, good=8, bad=False)
    server.set_policy({"latency_ms": 300})
    server.reset_stats()
    address = ray_cluster.get_runtime_context().gcs_address
    out = tmp_path / "out"
    command = [
        VKR, "run", "--videos", str(manifest), "--pool", str(pool), "--out", str(out),
        "--no-progress", "--engine", "ray", "--ray-address", address, "--workers", "2",
        "--concurrency", "4",
    ]  # fmt: skip
    driver = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while server.stats()["completions"] < 60 and driver.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    driver.kill()
    driver.wait()

    def workers_left() -> list[str]:
        return [
            a["name"]
            for a in ray_cluster.util.list_named_actors(all_namespaces=True)
            if a["name"].startswith("vkr-")
        ]

    # Ray ends an actor whose owner died: no worker goes on calling models for a dead run.
    deadline = time.monotonic() + 60
    while workers_left() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert workers_left() == []
    held = keys_vkr_holds(out)
    server.set_policy({})  # slow replies were for the kill to land mid-run
    rerun = subprocess.run(command, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    assert len(all_done(out)) == 8
    stats = server.stats()
    assert not set(stats["repeated_call_keys"]) & held
    assert stats["repeats"] <= 32  # only replies on the wire when the driver died
