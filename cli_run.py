"""`vkr generate` and `vkr run`: one video, or every item of an input file, through a
registered pipeline (generation by default). Registered like a plugin's commands."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path
from typing import Any

import click

from cli_options import (
    EXIT_CODES_HELP,
    ExitWith,
    engine_options,
    engine_settings,
    outage_options,
    pipeline_options,
)
from vkr_core.hookspecs import hookimpl
from vkr_core.store import RunLayout


@click.command(epilog=EXIT_CODES_HELP)
@click.option(
    "--video-id", required=True, help="Id of the video (its file name without extension)."
)
@click.option(
    "--videos-dir",
    default=".",
    show_default=True,
    type=click.Path(file_okay=False),
    help="Folder holding <video-id>.<ext> and an optional <video-id>.json metadata file; "
    "the video root: records hold video paths relative to it.",
)
@click.option("--pool", required=True, type=click.Path(dir_okay=False), help="Model pool YAML.")
@click.option(
    "--out", "run_dir", required=True, type=click.Path(file_okay=False), help="Run directory."
)
@click.option("--source", default="local", show_default=True, help="Video source plugin.")
@click.option("--discipline", help="Discipline of the video (chooses seed examples).")
@click.option("--subject", help="Subject, shown to KnowVid and KnowVidR generation.")
@click.option("--knowledge-point", help="Knowledge point term, shown to KnowVid and KnowVidR.")
@pipeline_options
@outage_options
@click.option("--log-level", default="WARNING", show_default=True)
def generate(
    video_id: str,
    videos_dir: str,
    pool: str,
    run_dir: str,
    source: str,
    discipline: str | None,
    subject: str | None,
    knowledge_point: str | None,
    force: bool,
    log_level: str,
    **settings: Any,
) -> None:
    """Generate verified QA examples for one video."""
    from cli_options import plugin_manager
    from graphs.generation import format_funnel, funnel
    from vkr_core.batch import ExitCode
    from vkr_core.config import RunConfig
    from vkr_core.log import configure_logging
    from vkr_core.preflight import PreflightError
    from vkr_core.run import process_items
    from vkr_core.sources import place_in_root

    configure_logging(log_level)
    pm = plugin_manager()
    video = pm.registry.get("source", source).resolve(
        video_id,
        videos_dir=videos_dir,
        discipline=discipline,
        subject=subject,
        knowledge_point=knowledge_point,
    )
    # Any source's file must sit under --videos-dir: checked here, before a call is paid for.
    video = place_in_root(video, videos_dir)
    config = RunConfig(video_root=os.path.abspath(videos_dir), **settings)
    try:
        [record] = asyncio.run(process_items([video], run_dir, pool, config, pm, force))
    except PreflightError as exc:
        raise ExitWith(str(exc), ExitCode.PREFLIGHT) from None
    except KeyboardInterrupt:
        click.echo("interrupted: finished work is saved; run the same command to resume", err=True)
        sys.exit(ExitCode.INTERRUPTED)
    if record is None:  # --state: not this driver's to process
        where = RunLayout(run_dir).record(video_id)
        click.echo(f"video {video_id}: done before, or another driver has it (record: {where})")
        return
    if record.status == "failed":
        raise ExitWith(f"video {video_id} failed: {record.failure}", ExitCode.VIDEOS_FAILED)
    gates = pm.registry.get("pipeline", config.pipeline).gate_order(pm.registry)
    click.echo(f"video {video_id}: {record.frames} frames")
    click.echo(format_funnel(funnel([record], gates)))
    click.echo(f"record: {RunLayout(run_dir).record(video_id)}")


@click.command("run", epilog=EXIT_CODES_HELP)
@click.option(
    "--videos",
    "--inputs",
    "manifest",
    required=True,
    type=click.Path(dir_okay=False),
    help="The pipeline's inputs (jsonl). For generation, the video manifest: video_id, "
    "path, discipline, subject, knowledge_point.",
)
@click.option(
    "--pipeline",
    default="generation",
    show_default=True,
    help="Registered pipeline to run (`vkr plugins` lists them).",
)
@click.option(
    "--video-root",
    type=click.Path(file_okay=False),
    default=None,
    show_default="the manifest's folder",
    help="Folder records' video paths are relative to; every video must be under it.",
)
@click.option("--pool", required=True, type=click.Path(dir_okay=False), help="Model pool YAML.")
@click.option(
    "--out", "run_dir", required=True, type=click.Path(file_okay=False), help="Run directory."
)
@click.option(
    "--concurrency",
    default=4,
    show_default=True,
    type=click.IntRange(min=1),
    help="Items (videos) in flight at once (per-model limits come from the pool).",
)
@click.option(
    "--target-accepted",
    type=click.IntRange(min=1),
    help="Stop launching new items once this many examples are accepted.",
)
@pipeline_options
@outage_options
@click.option(
    "--max-spend",
    type=click.FloatRange(min=0),
    metavar="USD",
    help="Stop starting items and model calls once the run directory has spent this much "
    "(earlier invocations included); calls in flight still land. Rerun to go on.",
)
@engine_options
@click.option("--strict-manifest", is_flag=True, help="Refuse to start if any input line is bad.")
@click.option(
    "--retry-failed",
    is_flag=True,
    help="Process again items that failed before (e.g. after replacing the file).",
)
@click.option("--no-progress", is_flag=True, help="No progress bar or progress lines.")
@click.option("--log-level", default="WARNING", show_default=True)
def run_command(
    manifest: str,
    pipeline: str,
    video_root: str | None,
    pool: str,
    run_dir: str,
    concurrency: int,
    target_accepted: int | None,
    force: bool,
    strict_manifest: bool,
    no_progress: bool,
    log_level: str,
    engine: str,
    ray_address: str | None,
    workers: int | None,
    **settings: Any,
) -> None:
    """Run a pipeline over every item of an input file (by default: generate verified
    examples for every video of a manifest); resumable after any kill."""
    from cli_options import plugin_manager
    from vkr_core.batch import ExitCode
    from vkr_core.config import RunConfig
    from vkr_core.log import configure_logging
    from vkr_core.preflight import PreflightError
    from vkr_core.run import run_items

    configure_logging(log_level)
    settings.update(engine_settings(engine, ray_address, workers, concurrency))
    pm = plugin_manager()
    chosen = pm.registry.get("pipeline", pipeline)
    loaded = chosen.read_items(manifest, RunConfig(video_root=video_root))
    for problem in loaded.problems:
        click.echo(f"manifest {manifest}: {problem.reason}", err=True)
    if loaded.problems and strict_manifest:
        raise click.ClickException(f"{len(loaded.problems)} bad manifest line(s); nothing was run")
    config = RunConfig(pipeline=pipeline, **{**settings, **loaded.settings})
    try:
        counters = asyncio.run(
            run_items(
                loaded.items,
                run_dir,
                pool,
                config,
                pm,
                force,
                concurrency,
                target_accepted,
                progress=not no_progress,
                problems=loaded.problems,
            )
        )
    except PreflightError as exc:
        raise ExitWith(str(exc), ExitCode.PREFLIGHT) from None
    except (KeyboardInterrupt, asyncio.CancelledError):
        click.echo("interrupted: finished work is saved; run the same command to resume", err=True)
        sys.exit(ExitCode.INTERRUPTED)
    click.echo(chosen.summary(Path(run_dir), counters) or counters.line())
    failed = len(loaded.problems) + counters.failed
    noun = f"{chosen.noun}(s)"
    if failed:
        click.echo(f"{failed} {noun} failed: see {RunLayout(run_dir).failures}")
    if counters.stopped == "budget":
        raise ExitWith(
            f"--max-spend reached: {counters.total - counters.done - counters.failed} {noun} "
            "not finished; finished work is saved; rerun with a higher --max-spend (or without "
            "it) to go on",
            ExitCode.BUDGET,
        )
    if failed:
        sys.exit(ExitCode.VIDEOS_FAILED)


@hookimpl
def vkr_register_commands(cli: Any) -> None:
    cli.add_command(generate)
    cli.add_command(run_command)
