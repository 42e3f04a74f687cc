"""The YouTube source against a loopback YouTube Data API server and real yt-dlp downloads."""

from __future__ import annotations

import asyncio
import json
from contextlib import AsyncExitStack
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import av
import pytest
from click.testing import CliRunner

from cli import cli
from plugins.providers.fake_youtube import FakeVideo, FakeYouTubeServer
from plugins.sources.youtube import (
    KeyRejected,
    QuotaExhausted,
    QuotaLedger,
    SearchReport,
    YouTubeClient,
    YouTubeError,
    open_ledger,
    parse_duration,
    quota_resets_at,
    search_youtube,
)
from plugins.sources.youtube_download import YouTubeDownloader, classify_download_error

DAY_ONE = datetime(2026, 12, 2, 23, 0, tzinfo=UTC)  # 15:00 PST on 2 December
LONG_DESCRIPTION = "How a rocket's thrust beats its weight at lift-off. " * 20


def search(
    server: FakeYouTubeServer, folder: Path, keywords: list[str], **options: Any
) -> SearchReport:
    options.setdefault("api_key", server.api_key)
    options.setdefault("backoff_seconds", 0.01)
    return asyncio.run(search_youtube(keywords, folder, base_url=server.base_url, **options))


def test_search_keeps_creative_commons_videos_up_to_30_minutes(
    vkr_youtube_server: FakeYouTubeServer, tmp_path: Path
) -> None:
    server = vkr_youtube_server
    server.add_videos(
        [
            FakeVideo("rocket00001", "Rocket launch", ("rocket launch",), LONG_DESCRIPTION),
            FakeVideo(
                "standard001", "Launch (all rights reserved)", ("rocket launch",), license="youtube"
            ),
            FakeVideo("lecture0001", "Two-hour lecture", ("rocket launch",), duration="PT45M1S"),
            FakeVideo("livestream1", "Live now", ("rocket launch",), duration="P0D"),
            FakeVideo("vanished001", "Gone since indexing", ("rocket launch",)),
            FakeVideo("pendulum001", "A pendulum clock", ("pendulum clock",), duration="PT29M59S"),
        ]
    )
    server.leave_out.add("vanished001")

    report = search(server, tmp_path, ["rocket launch", "pendulum clock"])

    assert [c.video_id for c in report.candidates] == ["rocket00001", "pendulum001"]
    rocket = report.candidates[0]
    assert rocket.description == LONG_DESCRIPTION  # the full text, not search's snippet
    assert (rocket.duration_seconds, rocket.license, rocket.channel) == (
        253,
        "creativeCommon",
        "Open Lab",
    )
    assert rocket.url == "https://www.youtube.com/watch?v=rocket00001"
    assert rocket.keywords == ["rocket launch"]
    reasons = {r.video_id: r.reason for r in report.rejected}
    assert "not creativeCommon" in reasons["standard001"]
    assert "longer than 30 min" in reasons["lecture0001"]
    assert "live stream" in reasons["livestream1"]
    assert report.missing == ["vanished001"]
    # Two searches at 100 units, one videos.list for all six ids at 1 unit.
    assert dict(server.units) == {"search": 200, "videos": 1}
    assert (report.quota.spent, report.quota.units) == (201, {"search": 200, "videos": 1})


def test_units_are_counted_exactly_and_a_rerun_replays_with_no_request(
    vkr_youtube_server: FakeYouTubeServer, tmp_path: Path
) -> None:
    server = vkr_youtube_server
    keywords = [f"topic {k}" for k in range(6)]
    server.add_videos(
        FakeVideo(f"vid{k}x{i:03d}", f"clip {k}.{i}", (keywords[k],))
        for k in range(6)
        for i in range(12)
    )
    first = search(server, tmp_path, keywords)
    # 10 per keyword (of 12 available), 60 ids: two videos.list requests of 50 and 10.
    assert len(first.candidates) == 60
    assert dict(server.requests) == {"search": 6, "videos": 2}
    assert dict(server.units) == {"search": 600, "videos": 2}
    assert first.quota.spent == 602

    again = search(server, tmp_path, keywords)
    assert dict(server.requests) == {"search": 6, "videos": 2}  # nothing asked again
    assert again.candidates == first.candidates
    assert again.quota.spent == 602
    for name in ("youtube.sqlite", "youtube.sqlite-wal"):
        file = tmp_path / name
        assert not file.exists() or server.api_key.encode() not in file.read_bytes()


def test_quota_exhaustion_stops_with_the_reset_time_and_the_next_day_finishes(
    tmp_path: Path,
) -> None:
    # YouTube's own count says 201 units a day; the ledger does not know it.
    videos = [FakeVideo(f"kw{i}video001", f"clip {i}", (f"keyword {i}",)) for i in range(3)]
    now = [DAY_ONE]
    with FakeYouTubeServer(videos, quota_limit=201) as server:
        keywords = ["keyword 0", "keyword 1", "keyword 2"]
        with pytest.raises(QuotaExhausted) as stopped:
            search(server, tmp_path, keywords, clock=lambda: now[0])
        message = str(stopped.value)
        assert "2026-12-03 00:00 PST" in message and "local time" in message
        assert stopped.value.resets_at == datetime(2026, 12, 3, 8, 0, tzinfo=UTC)
        assert server.answered == [("search", "keyword 0"), ("search", "keyword 1")]

        # The same day: the ledger knows the quota is gone and asks nothing.
        asked = server.requests.total()
        with pytest.raises(QuotaExhausted):
            search(server, tmp_path, keywords, clock=lambda: now[0])
        assert server.requests.total() == asked

        now[0] = DAY_ONE + timedelta(hours=10)  # past midnight Pacific
        server.new_day()
        report = search(server, tmp_path, keywords, clock=lambda: now[0])
    assert [c.video_id for c in report.candidates] == ["kw0video001", "kw1video001", "kw2video001"]
    # Every request YouTube answered was answered once.
    assert server.answered == [
        ("search", "keyword 0"),
        ("search", "keyword 1"),
        ("search", "keyword 2"),
        ("videos", "kw0video001,kw1video001,kw2video001"),
    ]
    assert (report.quota.day, report.quota.spent) == ("2026-12-03", 101)


def test_the_daily_quota_is_kept_before_asking(
    vkr_youtube_server: FakeYouTubeServer, tmp_path: Path
) -> None:
    server = vkr_youtube_server
    server.add_videos(
        [FakeVideo("a0000000001", "a", ("a",)), FakeVideo("b0000000001", "b", ("b",))]
    )
    with pytest.raises(QuotaExhausted, match=r"costs 100 units, 0 left"):
        search(server, tmp_path, ["a", "b"], daily_quota=100, clock=lambda: DAY_ONE)
    assert dict(server.requests) == {"search": 1}


def test_the_same_search_asked_at_once_is_sent_and_paid_once(
    vkr_youtube_server: FakeYouTubeServer, tmp_path: Path
) -> None:
    """Two points whose scenarios share a keyword search it at the same time: the second
    waits for the first's response instead of paying 100 units again."""
    server = vkr_youtube_server
    server.add_videos([FakeVideo("lathe000001", "Lathe", ("lathe in action",))])

    async def both() -> list[list[str]]:
        ledger = QuotaLedger(tmp_path, clock=lambda: DAY_ONE)
        try:
            async with YouTubeClient(server.api_key, ledger, server.base_url) as client:
                return list(
                    await asyncio.gather(
                        *(client.search_keyword("lathe in action") for _ in range(3))
                    )
                )
        finally:
            ledger.close()

    assert asyncio.run(both()) == [["lathe000001"]] * 3
    assert dict(server.requests) == {"search": 1}


def test_drivers_sharing_a_postgres_ledger_send_one_request_between_them(
    vkr_youtube_server: FakeYouTubeServer, vkr_postgres_url: str, tmp_path: Path
) -> None:
    """Drivers of one collection (each its own database session) searching the same keyword
    at the same moment: one sends it, the others replay the response it kept."""
    server = vkr_youtube_server
    server.add_videos([FakeVideo("lathe000001", "Lathe", ("lathe in action",))])

    async def drivers() -> list[list[str]]:
        ledgers = [
            open_ledger(tmp_path / f"d{i}", clock=lambda: DAY_ONE, state=vkr_postgres_url)
            for i in range(3)
        ]
        try:
            async with AsyncExitStack() as stack:
                clients = [
                    await stack.enter_async_context(
                        YouTubeClient(server.api_key, ledger, server.base_url)
                    )
                    for ledger in ledgers
                ]
                return list(
                    await asyncio.gather(*(c.search_keyword("lathe in action") for c in clients))
                )
        finally:
            for ledger in ledgers:
                ledger.close()

    assert asyncio.run(drivers()) == [["lathe000001"]] * 3
    assert dict(server.requests) == {"search": 1}
    ledger = open_ledger(tmp_path, clock=lambda: DAY_ONE, state=vkr_postgres_url)
    try:
        assert ledger.status().units == {"search": 100}
    finally:
        ledger.close()


def test_rate_limits_and_server_errors_are_retried(
    vkr_youtube_server: FakeYouTubeServer, tmp_path: Path
) -> None:
    server = vkr_youtube_server
    server.add_videos([FakeVideo("retry000001", "retry", ("retry",))])
    server.fail_next("search", "tooManyRequests")
    server.fail_next("search", "rateLimitExceeded")
    server.fail_next("videos", "backendError", times=2)
    report = search(server, tmp_path, ["retry"])
    assert [c.video_id for c in report.candidates] == ["retry000001"]
    assert dict(server.requests) == {"search": 3, "videos": 3}
    # Refused attempts were answered, so YouTube charged them, and so does the ledger.
    assert report.quota.spent == sum(server.units.values()) == 303

    server.fail_next("search", "backendError", times=5)
    with pytest.raises(YouTubeError, match=r"failed after 5 attempts: HTTP 503 backendError"):
        search(server, tmp_path, ["another"])


def test_an_invalid_key_stops_with_a_message_that_never_shows_it(
    vkr_youtube_server: FakeYouTubeServer, tmp_path: Path
) -> None:
    wrong = "AIzaWrongKeyWrongKeyWrongKey0123456789"
    with pytest.raises(KeyRejected) as refused:
        search(vkr_youtube_server, tmp_path, ["anything"], api_key=wrong)
    assert "keyInvalid" in str(refused.value) and "YOUTUBE_API_KEY" in str(refused.value)
    assert wrong not in str(refused.value)

    result = CliRunner().invoke(
        cli,
        ["youtube", "search", "anything", "--collection", str(tmp_path)],
        env={"YOUTUBE_API_KEY": wrong, "YOUTUBE_API_BASE": vkr_youtube_server.base_url},
    )
    assert result.exit_code == 1
    assert "YouTube refused the API key" in result.output and wrong not in result.output
    assert "Traceback" not in result.output


def test_cli_search_prints_candidates_and_the_quota_spent_today(
    vkr_youtube_server: FakeYouTubeServer, tmp_path: Path
) -> None:
    vkr_youtube_server.add_videos([FakeVideo("lever000001", "A crowbar as a lever", ("lever",))])
    env = {
        "YOUTUBE_API_KEY": vkr_youtube_server.api_key,
        "YOUTUBE_API_BASE": vkr_youtube_server.base_url,
    }
    result = CliRunner().invoke(
        cli, ["youtube", "search", "lever", "--collection", str(tmp_path)], env=env
    )
    assert result.exit_code == 0, result.output
    assert "lever000001    4:13  creativeCommon  A crowbar as a lever" in result.output
    assert "101 of 10,000 units spent" in result.output


def test_download_lands_the_file_with_attribution_and_never_twice(
    vkr_youtube_server: FakeYouTubeServer, tmp_path: Path
) -> None:
    server = vkr_youtube_server
    server.add_videos([FakeVideo("flask000001", "Titration", ("titration",), "Burette and flask.")])
    report = search(server, tmp_path / "collection", ["titration"])
    out = tmp_path / "videos"
    pauses: list[float] = []
    downloader = YouTubeDownloader(
        out, url_template=server.file_url_template, min_interval_seconds=0, sleep=pauses.append
    )
    [outcome] = downloader.download_many(
        ["flask000001"], {c.video_id: c for c in report.candidates}
    )
    assert outcome.status == "downloaded", outcome.message
    with av.open(outcome.path) as container:
        assert container.streams.video[0].frames == 10
    attribution = json.loads((out / "flask000001.attribution.json").read_text())
    assert attribution["channel"] == "Open Lab"
    assert attribution["title"] == "Titration"
    assert attribution["url"] == "https://www.youtube.com/watch?v=flask000001"
    assert attribution["license"].startswith("CC BY")
    assert attribution["published_at"] == "2024-03-01T12:00:00Z"

    fetched = server.file_requests["flask000001"]
    again = YouTubeDownloader(out, url_template=server.file_url_template).download("flask000001")
    assert again.status == "already"
    assert server.file_requests["flask000001"] == fetched

    # The source reads the folder back as videos, title from the attribution.
    from plugins.sources.youtube import YouTubeSource

    video = YouTubeSource().resolve("flask000001", videos_dir=out)
    assert (video.title, video.video_path) == ("Titration", "flask000001.mp4")


def test_download_failures_are_classified_and_rate_limits_pause(
    vkr_youtube_server: FakeYouTubeServer, tmp_path: Path
) -> None:
    server = vkr_youtube_server
    server.add_videos([FakeVideo("gone0000001", "gone"), FakeVideo("busy0000001", "busy")])
    server.file_failures.update({"gone0000001": 404, "busy0000001": 429})
    pauses: list[float] = []
    downloader = YouTubeDownloader(
        tmp_path,
        url_template=server.file_url_template,
        retries=0,
        min_interval_seconds=0,
        pause_seconds=5,
        rate_limit_attempts=3,
        sleep=pauses.append,
    )
    gone, busy = downloader.download_many(["gone0000001", "busy0000001"])
    assert (gone.status, gone.reason) == ("failed", "unavailable")
    assert "404" in gone.message and "\n" not in gone.message
    assert (busy.reason, busy.attempts) == ("rate_limited", 3)
    assert pauses == [5, 10]  # paused, doubling, before each new try
    recorded = json.loads((tmp_path / "gone0000001.failed.json").read_text())
    assert recorded["reason"] == "unavailable"


def test_downloads_are_spaced_out(vkr_youtube_server: FakeYouTubeServer, tmp_path: Path) -> None:
    server = vkr_youtube_server
    server.add_videos([FakeVideo("first000001", "1"), FakeVideo("second00001", "2")])
    waits: list[float] = []
    downloader = YouTubeDownloader(
        tmp_path,
        url_template=server.file_url_template,
        min_interval_seconds=30,
        sleep=waits.append,
        clock=lambda: 1000.0,  # no time passes between the two downloads
    )
    outcomes = downloader.download_many(["first000001", "second00001"])
    assert [o.status for o in outcomes] == ["downloaded", "downloaded"]
    assert waits == [30]


@pytest.mark.parametrize(
    ("message", "reason"),
    [
        (
            "ERROR: [youtube] abc: Private video. Sign in if you've been granted access to this video",
            "private",
        ),
        (
            "ERROR: [youtube] abc: Video unavailable. This video has been removed by the uploader",
            "unavailable",
        ),
        (
            "ERROR: [youtube] abc: Sign in to confirm your age. This video may be inappropriate for some users.",
            "age_restricted",
        ),
        (
            "ERROR: [youtube] abc: The uploader has not made this video available in your country",
            "geo_restricted",
        ),
        (
            "ERROR: [youtube] abc: Sign in to confirm you\u2019re not a bot. Use --cookies-from-browser",
            "bot_check",
        ),
        ("ERROR: unable to download video data: HTTP Error 429: Too Many Requests", "rate_limited"),
        ("ERROR: [generic] Unable to download webpage: HTTP Error 403: Forbidden", "forbidden"),
        ("ERROR: something nobody expected", "error"),
    ],
)
def test_yt_dlp_messages_are_classified(message: str, reason: str) -> None:
    assert classify_download_error(message) == reason


def test_durations_and_the_pacific_reset() -> None:
    assert [parse_duration(d) for d in ("PT15M51S", "PT1H", "PT45S", "P1DT2M", "P0D")] == [
        951,
        3600,
        45,
        86520,
        0,
    ]
    with pytest.raises(ValueError):
        parse_duration("15:51")
    # Winter (PST, UTC-8) and summer (PDT, UTC-7): the reset follows Pacific midnight.
    assert quota_resets_at(DAY_ONE) == datetime(2026, 12, 3, 8, 0, tzinfo=UTC)
    summer = datetime(2026, 7, 1, 6, 30, tzinfo=UTC)  # still 30 June in California
    assert quota_resets_at(summer) == datetime(2026, 7, 1, 7, 0, tzinfo=UTC)


def test_cli_download_uses_the_search_metadata_and_reports_failures(
    vkr_youtube_server: FakeYouTubeServer, tmp_path: Path
) -> None:
    server = vkr_youtube_server
    server.add_videos([FakeVideo("magnet00001", "Magnets", ("magnet",), channel="Physics Girl")])
    server.file_failures["nothere0001"] = 404
    env = {
        "YOUTUBE_API_KEY": server.api_key,
        "YOUTUBE_API_BASE": server.base_url,
        "VKR_YOUTUBE_URL_TEMPLATE": server.file_url_template,
    }
    collection, out = str(tmp_path / "collection"), str(tmp_path / "videos")
    runner = CliRunner()
    assert (
        runner.invoke(
            cli, ["youtube", "search", "magnet", "--collection", collection], env=env
        ).exit_code
        == 0
    )
    args = [
        "youtube",
        "download",
        "magnet00001",
        "nothere0001",
        "--out",
        out,
        "--collection",
        collection,
    ]
    result = runner.invoke(cli, [*args, "--interval", "0"], env=env)
    assert result.exit_code == 1  # one of the two failed
    assert f"magnet00001: {out}/magnet00001.mp4" in result.output
    assert "nothere0001: failed (unavailable): " in result.output
    attribution = json.loads((tmp_path / "videos" / "magnet00001.attribution.json").read_text())
    assert attribution["channel"] == "Physics Girl"

    result = runner.invoke(cli, [*args[:3], "--out", out], env=env)
    assert "magnet00001: already downloaded" in result.output


def test_cli_search_without_a_key_says_which_variable_to_set(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        cli, ["youtube", "search", "x", "--collection", str(tmp_path)], env={"YOUTUBE_API_KEY": ""}
    )
    assert result.exit_code == 1
    assert "no YouTube API key: set YOUTUBE_API_KEY" in result.output
