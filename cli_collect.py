"""`vkr collect`: from a knowledge bank to a manifest of Creative-Commons videos `vkr run` reads.

Imported by cli.py at every start: library imports stay inside the command.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import click

from cli_options import ExitWith, _state_url, engine_options, engine_settings
from vkr_core.hookspecs import hookimpl
from vkr_core.store import RunLayout

MODERATORS = {"azure": "azure-content-safety", "openai": "openai-moderation"}

COLLECT_EXIT_CODES = """\b
Exit codes: 0 done; 1 bad input or an error that stopped the run; 3 the run finished and
some knowledge points failed (run/failures.jsonl); 4 stopped with work left (the YouTube
quota ran out, or --max-spend was reached): rerun the same command after the quota resets
(the time is printed) or with a higher --max-spend; 5 preflight: a model does not answer;
130 Ctrl-C.
"""


@click.command(epilog=COLLECT_EXIT_CODES)
@click.option(
    "--bank",
    required=True,
    type=click.Path(exists=True, path_type=Path),
    help="A bank file (YAML or jsonl lectures: its knowledge points are built first, into "
    "OUT/bank) or a folder `vkr bank build` wrote.",
)
@click.option("--pool", required=True, type=click.Path(dir_okay=False), help="Model pool YAML.")
@click.option(
    "--out",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Collection folder: manifest.jsonl, videos/, links.jsonl, collect_report.json, "
    "the quota ledger and the run files.",
)
@click.option(
    "--youtube-api-base",
    envvar="YOUTUBE_API_BASE",
    help="YouTube Data API base URL (a loopback server in tests) [env: YOUTUBE_API_BASE].",
)
@click.option(
    "--download-url-template",
    envvar="VKR_YOUTUBE_URL_TEMPLATE",
    help="Download from this URL instead of YouTube, {id} replaced (a loopback server in "
    "tests) [env: VKR_YOUTUBE_URL_TEMPLATE].",
)
@click.option(
    "--daily-quota",
    type=click.IntRange(min=1),
    default=10_000,
    show_default=True,
    help="YouTube Data API units a day (search 100, videos.list 1).",
)
@click.option(
    "--moderation",
    type=click.Choice(["azure", "openai", "none"]),
    default="azure",
    show_default=True,
    help="Image moderation of 4 random frames per video: Azure AI Content Safety "
    "(AZURE_CONTENT_SAFETY_ENDPOINT, AZURE_CONTENT_SAFETY_KEY), OpenAI omni-moderation "
    "(OPENAI_API_KEY), or none.",
)
@click.option(
    "--moderation-endpoint", help="Moderation endpoint (default: the moderator's own setting)."
)
@click.option(
    "--download-interval",
    type=click.FloatRange(min=0),
    default=2.0,
    show_default=True,
    help="Seconds between downloads.",
)
@click.option("--concurrency", type=click.IntRange(1, 256), default=4, show_default=True)
@click.option(
    "--max-spend",
    type=click.FloatRange(min=0),
    metavar="USD",
    help="Stop starting model calls once the collection's run has spent this much.",
)
@click.option(
    "--state",
    callback=_state_url,
    metavar="URL",
    help="Keep the run's checkpoints, call cache and point claims, and the YouTube quota "
    "ledger, in this database (postgresql://user[:password]@host:port/db; needs "
    "vkr[postgres]), so several drivers can collect one bank with one API key. The password "
    "is never stored: give it in the URL each time, or in PGPASSWORD.",
)
@engine_options
@click.option("--force", is_flag=True, help="Reuse OUT even though its settings changed.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@click.option("--log-level", default="WARNING", show_default=True)
def collect(
    bank: Path,
    pool: str,
    out: Path,
    youtube_api_base: str | None,
    download_url_template: str | None,
    daily_quota: int,
    moderation: str,
    moderation_endpoint: str | None,
    download_interval: float,
    concurrency: int,
    max_spend: float | None,
    state: str | None,
    engine: str,
    ray_address: str | None,
    workers: int | None,
    force: bool,
    no_progress: bool,
    log_level: str,
) -> None:
    """Collect videos for every knowledge point of a bank: scenarios, keywords, YouTube
    search (Creative Commons, at most 30 min), relevance judges, download, moderation.

    Writes OUT/manifest.jsonl for `vkr run --videos OUT/manifest.jsonl`. A rerun of the same
    command pays for no model call, quota unit or download twice.
    """
    import asyncio

    from graphs.collection import NOW_ENV, format_report
    from graphs.collection import collect as run_collect
    from vkr_core.batch import ExitCode
    from vkr_core.log import configure_logging
    from vkr_core.preflight import PreflightError

    executor = engine_settings(engine, ray_address, workers, concurrency)
    if engine != "local" and state is None:
        # A video two points find is claimed in the shared state, so the workers (other
        # processes, other machines) judge and download it once.
        raise click.UsageError(
            f"--engine {engine} needs --state postgresql://...: the workers claim each video "
            "in the shared state so that one of them judges and downloads it"
        )
    configure_logging(log_level)
    settings: dict[str, Any] | None = None
    if moderation != "none":
        settings = {"provider": MODERATORS[moderation]}
        if moderation_endpoint:
            settings["endpoint"] = moderation_endpoint
    try:
        result = run_collect(
            bank,
            pool,
            out,
            youtube_api_base=youtube_api_base,
            download_url_template=download_url_template,
            daily_quota=daily_quota,
            moderation=settings,
            concurrency=concurrency,
            max_spend=max_spend,
            download_interval=download_interval,
            progress=not no_progress,
            now=os.environ.get(NOW_ENV),
            force=force,
            state=state,
            executor=executor["executor"],
            executor_options=executor["executor_options"],
        )
    except PreflightError as exc:
        raise ExitWith(str(exc), ExitCode.PREFLIGHT) from None
    except (KeyboardInterrupt, asyncio.CancelledError):
        click.echo("interrupted: finished work is saved; run the same command to resume", err=True)
        sys.exit(ExitCode.INTERRUPTED)
    click.echo(format_report(result.report))
    click.echo(f"manifest: {result.report['manifest']} ({result.report['kept']} video(s))")
    counters = result.counters
    if result.stopped is not None:
        # The source words the reset time (YouTube's day ends at midnight Pacific).
        resets = result.stopped.get("resets") or result.stopped["resets_at"]
        raise ExitWith(
            f"stopped: the YouTube quota is used up; rerun the same command after "
            f"{resets}: answered requests, calls and downloads are not paid again",
            ExitCode.BUDGET,
        )
    if counters.stopped == "budget":
        raise ExitWith(
            "--max-spend reached: work is left; rerun with a higher --max-spend to go on",
            ExitCode.BUDGET,
        )
    failed = result.report["points_failed"] + result.bank_failures
    if failed:
        click.echo(
            f"{failed} lecture(s) or knowledge point(s) failed: see {RunLayout(out / 'run').failures}"
        )
        sys.exit(ExitCode.VIDEOS_FAILED)


@hookimpl
def vkr_register_commands(cli: Any) -> None:
    cli.add_command(collect)
