"""`vkr youtube search|download`: try the YouTube source by hand.

Imported by cli.py at every start: library imports stay inside the commands.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from vkr_core.hookspecs import hookimpl

_COLLECTION = click.option(
    "--collection",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("collection"),
    show_default=True,
    help="Collection folder: holds the quota ledger (youtube.sqlite) and cached responses.",
)


@click.group()
def youtube() -> None:
    """Search YouTube for Creative-Commons videos and download them (key: YOUTUBE_API_KEY)."""


@youtube.command("search")
@click.argument("keywords", nargs=-1, required=True)
@_COLLECTION
@click.option("--daily-quota", type=click.IntRange(min=1), default=10_000, show_default=True)
@click.option("--max-minutes", type=click.IntRange(min=1), default=30, show_default=True)
@click.option(
    "--api-base",
    envvar="YOUTUBE_API_BASE",
    help="YouTube Data API base URL (a loopback server in tests) [env: YOUTUBE_API_BASE].",
)
@click.option("--json", "as_json", is_flag=True, help="Print the search report as JSON.")
def search_command(
    keywords: tuple[str, ...],
    collection: Path,
    daily_quota: int,
    max_minutes: int,
    api_base: str | None,
    as_json: bool,
) -> None:
    """Search KEYWORDS (top 10 each), keep Creative-Commons videos up to --max-minutes."""
    import asyncio

    from plugins.sources.youtube import describe_reset, search_youtube

    report = asyncio.run(
        search_youtube(
            keywords,
            collection,
            base_url=api_base,
            daily_quota=daily_quota,
            max_duration_seconds=max_minutes * 60,
        )
    )
    if as_json:
        click.echo(report.model_dump_json(indent=2))
        return
    for candidate in report.candidates:
        minutes, seconds = divmod(candidate.duration_seconds, 60)
        title = " ".join(candidate.title.split())[:70]
        click.echo(
            f"{candidate.video_id}  {minutes:3d}:{seconds:02d}  {candidate.license}  {title}"
        )
    for rejected in report.rejected:
        click.echo(f"dropped {rejected.video_id}: {rejected.reason}")
    for vid in report.missing:
        click.echo(f"missing {vid}: search found it, videos.list did not return it")
    quota = report.quota
    click.echo(
        f"{len(report.candidates)} candidates; quota {quota.day} (Pacific): "
        f"{quota.spent:,} of {quota.limit:,} units spent, resets {describe_reset(quota.resets_at)}"
    )


@youtube.command("download")
@click.argument("video_ids", nargs=-1, required=True)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True)
@_COLLECTION
@click.option(
    "--url-template",
    envvar="VKR_YOUTUBE_URL_TEMPLATE",
    help="Download from this URL instead of YouTube, {id} replaced (a loopback server in tests).",
)
@click.option(
    "--interval",
    type=click.FloatRange(min=0),
    default=2.0,
    show_default=True,
    help="Seconds between downloads.",
)
def download_command(
    video_ids: tuple[str, ...],
    out: Path,
    collection: Path,
    url_template: str | None,
    interval: float,
) -> None:
    """Download VIDEO_IDS (at most 720p mp4) into --out, each once, with attribution beside it.

    Title, channel and licence for the attribution come from an earlier `vkr youtube search`
    in the same --collection when there was one. An id that starts with '-' goes after
    '--', as for any command: `vkr youtube download --out DIR -- -dQw4w9WgXc`.
    """
    from plugins.sources.youtube import (
        LEDGER_FILE,
        Candidate,
        QuotaLedger,
        candidate_from_item,
    )
    from plugins.sources.youtube_download import YouTubeDownloader

    candidates: dict[str, Any] = {}
    if (collection / LEDGER_FILE).is_file():
        ledger = QuotaLedger(collection)
        try:
            for vid, item in ledger.known_videos(list(video_ids)).items():
                if item is not None:
                    found = candidate_from_item(item, max_duration=10**9)
                    if isinstance(found, Candidate):
                        candidates[vid] = found
        finally:
            ledger.close()
    downloader = YouTubeDownloader(out, url_template=url_template, min_interval_seconds=interval)
    failed = 0
    for outcome in downloader.download_many(video_ids, candidates):
        if outcome.status == "failed":
            failed += 1
            click.echo(f"{outcome.video_id}: failed ({outcome.reason}): {outcome.message}")
        elif outcome.status == "already":
            click.echo(f"{outcome.video_id}: already downloaded (in {downloader.archive.name})")
        else:
            click.echo(f"{outcome.video_id}: {outcome.path}")
    if failed:
        # Every outcome is printed first; the exit code tells a script that some failed.
        raise SystemExit(1)


@hookimpl
def vkr_register_commands(cli: Any) -> None:
    cli.add_command(youtube)
