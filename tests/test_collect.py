"""`vkr collect`: from the worked example bank to a manifest `vkr run` reads, offline.

Everything a user's collection would reach is a real server on 127.0.0.1 speaking the real
protocol: the model server (litellm over HTTP), YouTube Data API v3 and the video files
(fetched by the real yt-dlp), Azure AI Content Safety. The fake YouTube finds a video when
one of its keywords is in the query; the model writes queries from the point's term, and
every lecture's title is one of its points, so the fixtures below are found by the title
points of the example bank.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from cli import cli
from plugins.providers.fake_moderation import FakeAzureContentSafety
from plugins.providers.fake_server import FakeModelServer, write_pool
from plugins.providers.fake_youtube import FakeVideo, FakeYouTubeServer, clip_file
from plugins.pytest_plugin import FAKE_MODERATION_KEY
from vkr_core.plugins import get_plugin_manager

VKR = str(Path(sys.executable).parent / "vkr")

VIDEOS = [
    # Kept: found by the lathe lecture's title point only.
    FakeVideo("lathe0001", "Turning a steel shaft on a lathe", ("turning on a lathe",), shade=1),
    # Kept: found by two points (the lathe and the gear-train lectures) and by several of
    # their keywords; judged, downloaded and moderated once, linked to both. Its id starts
    # with "-", as YouTube ids may.
    FakeVideo(
        "-gear_lathe",
        "A lathe's gear train, close up",
        ("gear trains", "turning on a lathe"),
        description="Change gears of a screw-cutting lathe.",
        shade=2,
    ),
    # Dropped by videos.list checks: not Creative Commons; 45 minutes long.
    FakeVideo("torque0001", "Torque wrench", ("rotational dynamics",), license="youtube", shade=3),
    FakeVideo("heat000001", "Heat transfer lecture", ("heat transfer",), duration="PT45M", shade=4),
    # Found by search, then missing from videos.list (removed since indexing).
    FakeVideo("heat_gone1", "Convection cells", ("heat transfer",), shade=5),
    # Turned down by the metadata judge.
    FakeVideo("newton_off", "Off-topic vlog about my weekend", ("newton's laws",), shade=6),
    # Relevant, downloaded, then flagged by image moderation.
    FakeVideo("newton_bad", "Crash test: Newton's laws at work", ("newton's laws",), shade=7),
    # Relevant, but the file is gone (404): a download failure.
    FakeVideo("gear_404_01", "Gear train in a clock", ("gear trains",), shade=8),
]
UNSAFE = "newton_bad"
EXPECTED_FUNNEL = {
    "candidates": 8,
    "cc_short": 5,
    "metadata_pass": 4,
    "downloaded": 3,
    "visual_pass": 3,
    "safe": 2,
}
KEPT = ["-gear_lathe", "lathe0001"]


def youtube_server() -> FakeYouTubeServer:
    """The fake YouTube of this module's VIDEOS, not yet started."""
    server = FakeYouTubeServer(VIDEOS, match="contains")
    server.leave_out.add("heat_gone1")
    server.file_failures["gear_404_01"] = 404
    return server


@pytest.fixture
def youtube() -> Iterator[FakeYouTubeServer]:
    server = youtube_server()
    server.start()
    try:
        yield server
    finally:
        server.stop()


def mark_unsafe(azure: Any, video_id: str, tmp_path: Path) -> None:
    """Mark every frame the collection will sample from this video's file as violent."""
    from graphs.collection import CollectConfig
    from vkr_core.plugins import get_plugin_manager
    from vkr_core.video import sample_frames

    shade = next(v.shade for v in VIDEOS if v.video_id == video_id)
    config = CollectConfig()
    frames = sample_frames(
        clip_file(shade),
        tmp_path / "marked-frames",
        fps=config.frame_fps,
        max_frames=config.frame_max,
        pm=get_plugin_manager(),
    )
    for frame in frames:
        azure.mark(frame.sha256, {"Violence": 6})


def make_world(
    folder: Path, pool: Path, models: Any, azure: Any, youtube: FakeYouTubeServer
) -> dict[str, Any]:
    """What a collection reaches, from started servers; the example bank written in ``folder``."""
    # The judges pass everything but what a model would turn down (an off-topic title).
    models.set_policy(
        {"steps": {"metadata_relevance": {"relevant": 1.0}, "visual_relevance": {"relevant": 1.0}}}
    )
    mark_unsafe(azure, UNSAFE, folder)
    bank = folder / "bank.yaml"
    # In this process: a new `vkr` process would spend seconds importing to copy one file.
    written = CliRunner().invoke(cli, ["bank", "example", str(bank)])
    assert written.exit_code == 0, written.output
    env = {
        **os.environ,
        "YOUTUBE_API_KEY": youtube.api_key,
        "AZURE_CONTENT_SAFETY_ENDPOINT": str(azure.url),
        "AZURE_CONTENT_SAFETY_KEY": FAKE_MODERATION_KEY,
        "VKR_COLLECT_NOW": "2026-12-02T18:00:00+00:00",
    }
    return {
        "bank": bank,
        "pool": pool,
        "env": env,
        "models": models,
        "azure": azure,
        "youtube": youtube,
    }


@pytest.fixture
def world(
    tmp_path: Path,
    vkr_pool: Path,
    vkr_fake_server: Any,
    vkr_fake_azure_content_safety: Any,
    youtube: FakeYouTubeServer,
) -> dict[str, Any]:
    return make_world(tmp_path, vkr_pool, vkr_fake_server, vkr_fake_azure_content_safety, youtube)


@dataclass(frozen=True)
class Collected:
    """One collection from the example bank, in a world of its own, and what it cost then."""

    world: dict[str, Any]
    out: Path
    result: subprocess.CompletedProcess[str]
    paid: dict[str, Any]
    lines: list[dict[str, Any]]


@pytest.fixture(scope="module")
def collected(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Collected]:
    # Collected once for the module: the end-to-end test reads it, and the kill test compares
    # its killed and resumed collection with it.
    folder = tmp_path_factory.mktemp("collected")
    with ExitStack() as servers:
        models = servers.enter_context(FakeModelServer(seed=0))
        azure = servers.enter_context(FakeAzureContentSafety(api_key=FAKE_MODERATION_KEY))
        tube = servers.enter_context(youtube_server())
        pool = write_pool(
            folder / "pool.yaml",
            models.base_url,
            registry_path=folder / "eligibility.yaml",
            pm=get_plugin_manager(),
        )
        world = make_world(folder, Path(pool), models, azure, tube)
        out = folder / "collection"
        result = ok(run_collect(world, out))
        yield Collected(world, out, result, counts(world), manifest_lines(out))


def collect_args(world: dict[str, Any], out: Path, *extra: str) -> list[str]:
    youtube = world["youtube"]
    return [
        VKR,
        "collect",
        "--bank",
        str(world["bank"]),
        "--pool",
        str(world["pool"]),
        "--out",
        str(out),
        "--youtube-api-base",
        youtube.base_url,
        "--download-url-template",
        youtube.file_url_template,
        "--download-interval",
        "0",
        "--concurrency",
        "1",
        "--no-progress",
        *extra,
    ]


def run_collect(
    world: dict[str, Any], out: Path, *extra: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        collect_args(world, out, *extra),
        capture_output=True,
        text=True,
        timeout=300,
        env=env or world["env"],
    )


def ok(result: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert result.returncode == 0, f"{result.returncode}\n{result.stdout}\n{result.stderr}"
    return result


def manifest_lines(out: Path) -> list[dict[str, Any]]:
    text = (out / "manifest.jsonl").read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines()]


# ---------------------------------------------------------------- (a) end to end


@pytest.mark.slow
def test_collect_from_the_example_bank_to_a_manifest_vkr_run_consumes(tmp_path, collected):
    world, out, result = collected.world, collected.out, collected.result
    report = json.loads((out / "collect_report.json").read_text())
    funnel = report["funnel"]
    assert {k: funnel[k] for k in EXPECTED_FUNNEL} == EXPECTED_FUNNEL
    assert funnel["points"] >= 5 and funnel["scenarios"] >= funnel["points"]
    assert funnel["keywords"] >= funnel["scenarios"]
    assert report["dropped"] == {
        "download failed": 1,
        "metadata rejected": 1,
        "missing from videos.list": 1,
        "not Creative Commons": 1,
        "too long": 1,
        "unsafe": 1,
    }
    assert "collection funnel:" in result.stdout and "safe (kept)" in result.stdout
    assert "per kept video" in result.stdout and "moderation requests" in result.stdout

    # The manifest: the kept videos, with what `vkr run` and CC BY attribution need.
    lines = manifest_lines(out)
    assert [line["video_id"] for line in lines] == KEPT
    shared = lines[0]
    assert shared["path"] == "videos/-gear_lathe.mp4" and (out / shared["path"]).is_file()
    assert shared["discipline"] == "Engineering" and shared["subject"] == "Mechanical Engineering"
    assert shared["knowledge_point"]["term"] and shared["knowledge_point"]["definition"]
    assert shared["title"] == "A lathe's gear train, close up"
    assert shared["source"]["url"] == "https://www.youtube.com/watch?v=-gear_lathe"
    assert shared["source"]["license"].startswith("CC BY")
    assert shared["source"]["channel"] == "Open Lab" and shared["source"]["published_at"]

    # Found by two points, by more than one keyword: judged, downloaded, moderated once.
    links = [json.loads(x) for x in (out / "links.jsonl").read_text().splitlines()]
    shared_links = [link for link in links if link["video_id"] == "-gear_lathe"]
    assert len(shared_links) == 2
    assert sum(link["judged_against"] for link in shared_links) == 1
    youtube = world["youtube"]
    assert youtube.file_requests["-gear_lathe"] == youtube.file_requests["lathe0001"]
    requests = world["models"].received()
    judged = [
        r
        for r in requests
        if r.step == "metadata_relevance" and any("gear train, close up" in t for t in r.texts)
    ]
    assert len(judged) == 1
    assert sum(1 for r in requests if r.step == "visual_relevance") == 3
    # 4 frames for each of the three videos that reached moderation, each image once.
    assert world["azure"].requests == 12 == report["moderation_requests"]
    assert report["quota"]["units_total"] == sum(youtube.units.values()) > 0

    # `vkr run` takes the manifest as it is.
    run = subprocess.run(
        [
            VKR,
            "run",
            "--videos",
            str(out / "manifest.jsonl"),
            "--pool",
            str(world["pool"]),
            "--out",
            str(tmp_path / "run"),
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode in (0, 3), run.stderr
    records = sorted(p.stem for p in (tmp_path / "run" / "records").glob("*.json"))
    assert records == KEPT

    # Every collection step can be piloted from the inputs the collection recorded.
    from graphs.collection import MODEL_STEPS

    for step in MODEL_STEPS:
        # In this process: four new `vkr` processes would spend seconds each importing.
        pilot = CliRunner().invoke(
            cli,
            ["qualify", "pilot", "--step", step, "--model", "fake-b", "--n", "2"]
            + ["--pool", str(world["pool"]), "--from", str(out / "run")]
            + ["--out", str(tmp_path / f"pilot-{step}")],
        )
        assert pilot.exit_code == 0, pilot.output
        assert f"inputs of {step}" in pilot.stdout, pilot.stdout

    # A rerun pays for nothing and writes the same manifest.
    before = (out / "manifest.jsonl").read_bytes()
    paid = world["models"].stats()["completions"]
    units = dict(youtube.units)
    ok(run_collect(world, out))
    assert (out / "manifest.jsonl").read_bytes() == before
    assert world["models"].stats()["completions"] == paid
    assert dict(youtube.units) == units and world["azure"].requests == 12


def counts(world: dict[str, Any]) -> dict[str, Any]:
    youtube = world["youtube"]
    return {
        "units": sum(youtube.units.values()),
        "answered": list(youtube.answered),
        "files": dict(youtube.file_requests),
        "completions": world["models"].stats()["completions"],
        "moderation": world["azure"].requests,
    }


# ---------------------------------------------------------------- (b) kill -9, rerun


@pytest.mark.slow
def test_collect_killed_at_three_moments_pays_for_nothing_twice(tmp_path, world, collected):
    paid = collected.paid  # what one uninterrupted collection cost

    out = tmp_path / "collection"
    rng = random.Random()
    seed = rng.randrange(10**6)
    rng.seed(seed)
    youtube, models, azure = world["youtube"], world["models"], world["azure"]
    # Three moments: among the model calls of the first points, at the downloads, and
    # during moderation; each later rerun is killed further on.
    moments = [
        lambda: models.stats()["completions"] >= first,
        lambda: sum(youtube.file_requests.values()) >= 1,
        lambda: azure.requests >= third,
    ]
    first, third = rng.randint(2, 12), rng.randint(1, 8)
    kills = 0
    for reached in moments:
        proc = subprocess.Popen(
            collect_args(world, out),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=world["env"],
        )
        deadline = time.monotonic() + 120
        while not reached() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            kills += 1
        proc.wait()
    ok(run_collect(world, out))
    after = counts(world)
    note = f"random seed {seed}, {kills} kill(s)"
    # At most the request on the wire at each kill is asked again.
    assert models.stats()["repeats"] <= kills, note
    repeated = len(after["answered"]) - len(set(after["answered"]))
    assert repeated <= kills, note
    assert after["units"] <= paid["units"] + 100 * kills, note
    assert kills >= 2, note  # the runs were cut short, not left to finish
    # A download is two GETs by yt-dlp; a kill may cut the one on the wire, never another.
    assert set(after["files"]) == set(paid["files"]), note
    extra = sum(n - paid["files"][vid] for vid, n in after["files"].items())
    assert 0 <= extra <= 2 * kills, note
    # A video's 4 frames are moderated at once: at most those on the wire are sent again.
    assert after["moderation"] <= paid["moderation"] + 4 * kills, note
    assert manifest_lines(out) == collected.lines, note


# ---------------------------------------------------------------- (c) the quota runs out


@pytest.mark.slow
def test_quota_exhaustion_stops_with_the_reset_time_and_the_rerun_finishes(tmp_path, world):
    youtube = world["youtube"]
    youtube.quota_limit = 1_500  # the collection needs about 2,700 units
    out = tmp_path / "collection"
    first = run_collect(world, out)
    assert first.returncode == 4, first.stderr
    assert "YouTube quota is used up" in first.stderr
    assert "rerun the same command after 2026-12-03 00:00 PST" in first.stderr
    report = json.loads((out / "collect_report.json").read_text())
    assert report["stopped"] and report["funnel"]["safe"] < 2
    assert not manifest_lines(out) or len(manifest_lines(out)) < 2

    # The same day, nothing more is asked of YouTube.
    asked = sum(youtube.requests.values())
    again = run_collect(world, out)
    assert again.returncode == 4 and sum(youtube.requests.values()) == asked

    # The next Pacific day the quota is back, and the rerun finishes.
    youtube.new_day()
    paid = world["models"].stats()["completions"]
    tomorrow = {**world["env"], "VKR_COLLECT_NOW": "2026-12-03T18:00:00+00:00"}
    ok(run_collect(world, out, env=tomorrow))
    assert world["models"].stats()["repeats"] == 0
    assert world["models"].stats()["completions"] > paid
    assert len(youtube.answered) == len(set(youtube.answered))  # no request answered twice
    assert [line["video_id"] for line in manifest_lines(out)] == KEPT
    funnel = json.loads((out / "collect_report.json").read_text())["funnel"]
    assert {k: funnel[k] for k in EXPECTED_FUNNEL} == EXPECTED_FUNNEL


# ---------------------------------------------------------------- (d) qualification


def test_every_collection_step_is_in_the_eligibility_table(tmp_path, vkr_pool):
    result = subprocess.run(
        [
            VKR,
            "qualify",
            "table",
            "--registry",
            str(tmp_path / "eligibility.yaml"),
            "--pool",
            str(vkr_pool),
            "--markdown",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    from graphs.collection import MODEL_STEPS

    for step in ["knowledge_points", *MODEL_STEPS]:
        assert f"| `{step}` |" in result.stdout, step


def test_collect_needs_a_youtube_key_and_says_so(tmp_path, world):
    env = {k: v for k, v in world["env"].items() if k != "YOUTUBE_API_KEY"}
    result = run_collect(world, tmp_path / "collection", env=env)
    assert result.returncode == 1
    assert "YOUTUBE_API_KEY" in result.stderr and "Traceback" not in result.stderr


# ---------------------------------------------------------------- (e) the demo


@pytest.mark.slow
def test_demo_collect_runs_offline_from_the_example_bank_to_vkr_run(tmp_path):
    result = subprocess.run(
        [VKR, "demo", "--collect", "--out", str(tmp_path / "demo"), "--port", "0"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "collection funnel:" in out and "safe (kept)" in out
    assert "metadata rejected 1, not Creative Commons 1, too long 1, unsafe 1" in out
    assert "manifest: " in out and "(3 video(s))" in out
    assert "vkr run on the manifest: videos 3/3 (failed 0)" in out
    lines = (tmp_path / "demo" / "collect" / "collection" / "manifest.jsonl").read_text()
    assert len(lines.splitlines()) == 3


def test_a_refused_youtube_key_stops_the_collection_with_one_line(tmp_path, world):
    env = {**world["env"], "YOUTUBE_API_KEY": "AIzaWrongKey-0000000000000000000000"}
    result = run_collect(world, tmp_path / "collection", env=env)
    assert result.returncode == 1
    assert "YouTube refused the API key in YOUTUBE_API_KEY (keyInvalid" in result.stderr
    assert "AIzaWrongKey" not in result.stderr + result.stdout and "Traceback" not in result.stderr
    assert sum(world["youtube"].requests.values()) <= 4  # the points in flight, then no more
    # Nothing was recorded as failed: with the right key the same command collects.
    ok(run_collect(world, tmp_path / "collection", "--concurrency", "4"))
    assert [line["video_id"] for line in manifest_lines(tmp_path / "collection")] == KEPT


@pytest.mark.slow
def test_concurrent_points_wait_for_one_judgement_per_video(tmp_path, world):
    out = tmp_path / "collection"
    ok(run_collect(world, out, "--concurrency", "4"))
    funnel = json.loads((out / "collect_report.json").read_text())["funnel"]
    assert {k: funnel[k] for k in EXPECTED_FUNNEL} == EXPECTED_FUNNEL
    youtube = world["youtube"]
    # Each video downloaded once (yt-dlp's two GETs), whichever points found it at once.
    assert youtube.file_requests["-gear_lathe"] == youtube.file_requests["lathe0001"]
    shared = [
        r
        for r in world["models"].received("metadata_relevance")
        if any("gear train, close up" in t for t in r.texts)
    ]
    assert len(shared) == 1
    assert world["azure"].requests == 12
    assert len(youtube.answered) == len(set(youtube.answered))


def test_moderation_without_an_endpoint_stops_before_any_search(tmp_path, world):
    env = {k: v for k, v in world["env"].items() if k != "AZURE_CONTENT_SAFETY_ENDPOINT"}
    result = run_collect(world, tmp_path / "collection", env=env)
    assert result.returncode == 1
    assert "AZURE_CONTENT_SAFETY_ENDPOINT" in result.stderr and "Traceback" not in result.stderr
    assert sum(world["youtube"].requests.values()) == 0
