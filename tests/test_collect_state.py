"""`vkr collect --state postgresql://...`: the collection's run state and its YouTube quota
ledger in a real PostgreSQL server, shared by every driver of a collection.

Everything else is as in test_collect: the real model client against the fake model server,
a fake YouTube Data API (which counts the units it was asked for) and the real yt-dlp, all
on 127.0.0.1.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
from test_collect import (  # noqa: F401  (fixtures)
    KEPT,
    VKR,
    collect_args,
    make_world,
    manifest_lines,
    ok,
    run_collect,
    world,
    youtube,
    youtube_server,
)

from plugins.backends.postgres import run_schema
from plugins.backends.postgres_ledger import SCHEMA
from plugins.providers.fake_moderation import FakeAzureContentSafety
from plugins.providers.fake_server import FakeModelServer, write_pool
from plugins.pytest_plugin import FAKE_MODERATION_KEY
from vkr_core.backends import split_password
from vkr_core.plugins import get_plugin_manager

QUOTA = 1_500  # units a day; the collection needs about 2,700


def build_bank(setup: dict[str, Any], out: Path) -> Path:
    """The example bank's knowledge points, built once: drivers started together share it."""
    subprocess.run(
        [VKR, "bank", "build", "--bank", str(setup["bank"]), "--pool", str(setup["pool"])]
        + ["--out", str(out), "--no-progress"],
        check=True,
        capture_output=True,
        timeout=300,
    )
    return out


@dataclass(frozen=True)
class Single:
    """One local driver's collection without shared state: what every test here must match."""

    built: Path
    manifest: bytes
    lines: list[dict[str, Any]]
    units: int
    files: dict[str, int]


@pytest.fixture(scope="module")
def single(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Single]:
    # Built and collected once for the module, on servers of its own: each test's world is
    # fresh, so what it counts is its drivers' requests alone.
    folder = tmp_path_factory.mktemp("single")
    with ExitStack() as servers:
        models = servers.enter_context(FakeModelServer(seed=0))
        azure = servers.enter_context(FakeAzureContentSafety(api_key=FAKE_MODERATION_KEY))
        tube = servers.enter_context(youtube_server())
        pool = Path(
            write_pool(
                folder / "pool.yaml",
                models.base_url,
                registry_path=folder / "eligibility.yaml",
                pm=get_plugin_manager(),
            )
        )
        setup = make_world(folder, pool, models, azure, tube)
        built = build_bank(setup, folder / "built")
        ok(run_collect({**setup, "bank": built}, folder / "collection"))
        yield Single(
            built=built,
            manifest=(folder / "collection" / "manifest.jsonl").read_bytes(),
            lines=manifest_lines(folder / "collection"),
            units=sum(tube.units.values()),
            files={vid: tube.file_requests[vid] for vid in KEPT},
        )


def with_built_bank(setup: dict[str, Any], single: Single, tmp_path: Path) -> dict[str, Any]:
    """This test's world collecting from its own copy of the built bank."""
    return {**setup, "bank": shutil.copytree(single.built, tmp_path / "built")}


def ledger_units(url: str, day: str | None = None) -> int:
    with psycopg.connect(url) as conn:
        if day is None:
            row = conn.execute(f"SELECT COALESCE(SUM(units), 0) FROM {SCHEMA}.spend").fetchone()
        else:
            row = conn.execute(
                f"SELECT COALESCE(SUM(units), 0) FROM {SCHEMA}.spend WHERE day = %s", (day,)
            ).fetchone()
    assert row is not None
    return int(row[0])


def without_point(lines: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Manifest lines less the knowledge point a video was judged against: a video two
    points find is judged against whichever reached it first, which with two drivers is a
    matter of timing (as with --concurrency above 1 in one driver)."""
    return [{k: v for k, v in line.items() if k != "knowledge_point"} for line in lines]


def files_under(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file()]


@pytest.mark.slow
def test_collect_with_state_writes_the_same_manifest_and_keeps_the_password_out(
    tmp_path,
    world,  # noqa: F811  (the fixture)
    single,
    vkr_postgres_url,
):
    world = with_built_bank(world, single, tmp_path)
    tube = world["youtube"]
    shared = tmp_path / "shared"
    result = ok(run_collect(world, shared, "--state", vkr_postgres_url))
    assert (shared / "manifest.jsonl").read_bytes() == single.manifest
    assert [line["video_id"] for line in manifest_lines(shared)] == KEPT

    # The quota was charged to the database, not to a file in the folder, unit for unit.
    assert not (shared / "youtube.sqlite").exists()
    paid = sum(tube.units.values())
    assert paid == single.units > 0 and ledger_units(vkr_postgres_url) == paid
    report = json.loads((shared / "collect_report.json").read_text())
    assert report["quota"]["units_total"] == paid

    # The password is in no file of the collection, nor in what the command printed.
    password = split_password(vkr_postgres_url)[1]
    assert password
    assert password not in result.stdout + result.stderr
    for path in files_under(shared):
        assert password.encode() not in path.read_bytes(), path
    public = split_password(vkr_postgres_url)[0]
    assert json.loads((shared / "run" / "config.json").read_text())["config"]["state"] == public

    # A rerun on the state pays for nothing.
    units = dict(tube.units)
    paid_calls = world["models"].stats()["completions"]
    ok(run_collect(world, shared, "--state", vkr_postgres_url))
    assert dict(tube.units) == units
    assert world["models"].stats()["completions"] == paid_calls

    # A wrong password: one line, before the folder is made.
    wrong = vkr_postgres_url.replace(f":{password}@", ":not-the-password@")
    refused = run_collect(world, tmp_path / "refused", "--state", wrong)
    assert refused.returncode == 1, refused.stderr
    assert "cannot use the state database" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    assert "not-the-password" not in refused.stderr
    assert not (tmp_path / "refused").exists()


@pytest.mark.slow
def test_two_drivers_with_one_key_keep_to_one_quota_and_the_rerun_finishes(
    tmp_path,
    world,  # noqa: F811  (the fixture)
    single,
    vkr_postgres_url,
):
    world = with_built_bank(world, single, tmp_path)
    tube = world["youtube"]
    shared = tmp_path / "shared"
    args = collect_args(world, shared, "--state", vkr_postgres_url, "--daily-quota", str(QUOTA))
    drivers = [
        subprocess.Popen(
            args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=world["env"]
        )
        for _ in range(2)
    ]
    outputs = [driver.communicate(timeout=600) for driver in drivers]
    for driver, (_, err) in zip(drivers, outputs, strict=True):
        assert driver.returncode == 4, err
        assert "YouTube quota is used up" in err
        assert "rerun the same command after 2026-12-03 00:00 PST" in err

    # Together they spent the quota and no more: what YouTube counted is what the shared
    # ledger holds, and no further search (100 units) would have fitted.
    spent = sum(tube.units.values())
    assert spent == ledger_units(vkr_postgres_url, "2026-12-02")
    assert QUOTA - 100 < spent <= QUOTA

    # The next Pacific day one driver finishes the collection, paying for nothing twice.
    tube.new_day()
    tomorrow = {**world["env"], "VKR_COLLECT_NOW": "2026-12-03T18:00:00+00:00"}
    ok(run_collect(world, shared, "--state", vkr_postgres_url, env=tomorrow))
    assert without_point(manifest_lines(shared)) == without_point(single.lines)
    assert world["models"].stats()["repeats"] == 0
    assert len(tube.answered) == len(set(tube.answered))
    assert sum(tube.units.values()) == ledger_units(vkr_postgres_url)
    # Each video was judged and downloaded once across the drivers.
    assert {vid: tube.file_requests[vid] for vid in KEPT} == single.files
    judged = [
        r
        for r in world["models"].received()
        if r.step == "metadata_relevance" and any("gear train, close up" in t for t in r.texts)
    ]
    assert len(judged) == 1


@pytest.mark.slow
def test_collect_on_ray_writes_the_same_manifest_and_judges_each_video_once(
    tmp_path,
    world,  # noqa: F811  (the fixture)
    single,
    vkr_postgres_url,
):
    world = with_built_bank(world, single, tmp_path)
    tube = world["youtube"]

    # Without a shared state the workers could not claim the videos they share: refused.
    refused = run_collect(world, tmp_path / "no-state", "--engine", "ray")
    assert refused.returncode == 2 and "--engine ray needs --state" in refused.stderr
    assert not (tmp_path / "no-state").exists()

    on_ray = tmp_path / "ray"
    ok(
        run_collect(
            world,
            on_ray,
            "--state",
            vkr_postgres_url,
            "--engine",
            "ray",
            "--workers",
            "2",
            "--concurrency",
            "2",
        )
    )
    assert without_point(manifest_lines(on_ray)) == without_point(single.lines)
    # Both workers collected: each claims what it works on under an owner of its own.
    with psycopg.connect(vkr_postgres_url) as conn:
        rows = conn.execute(
            f'SELECT item_id, state, owner FROM "{run_schema(on_ray / "run")}".items'
        ).fetchall()
    assert {state for _, state, _ in rows} == {"done"}
    assert len({owner for item, _, owner in rows if not item.startswith("video:")}) == 2
    assert {item for item, _, _ in rows if item.startswith("video:")} >= {
        f"video:{vid}" for vid in KEPT
    }
    # The same YouTube requests as one local driver, each answered once.
    assert sum(tube.units.values()) == single.units == ledger_units(vkr_postgres_url)
    assert len(tube.answered) == len(set(tube.answered))
    assert {vid: tube.file_requests[vid] for vid in KEPT} == single.files
    judged = [
        r
        for r in world["models"].received()
        if r.step == "metadata_relevance" and any("gear train, close up" in t for t in r.texts)
    ]
    assert len(judged) == 1
    assert world["models"].stats()["repeats"] == 0


@pytest.mark.slow
def test_collect_on_ray_stops_at_the_quota_and_the_rerun_finishes(
    tmp_path,
    world,  # noqa: F811  (the fixture)
    single,
    vkr_postgres_url,
):
    world = with_built_bank(world, single, tmp_path)
    tube = world["youtube"]
    on_ray = tmp_path / "ray"
    ray = ("--state", vkr_postgres_url, "--engine", "ray", "--workers", "2", "--concurrency", "2")
    first = run_collect(world, on_ray, *ray, "--daily-quota", str(QUOTA))
    assert first.returncode == 4, first.stderr
    assert "YouTube quota is used up" in first.stderr
    spent = sum(tube.units.values())
    assert spent == ledger_units(vkr_postgres_url, "2026-12-02")
    assert QUOTA - 100 < spent <= QUOTA

    tube.new_day()
    tomorrow = {**world["env"], "VKR_COLLECT_NOW": "2026-12-03T18:00:00+00:00"}
    ok(run_collect(world, on_ray, *ray, "--daily-quota", str(QUOTA), env=tomorrow))
    assert without_point(manifest_lines(on_ray)) == without_point(single.lines)
    assert world["models"].stats()["repeats"] == 0
    assert len(tube.answered) == len(set(tube.answered))
