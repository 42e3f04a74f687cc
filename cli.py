"""The `vkr` command line: thin wrappers that parse, call library code and print."""

from __future__ import annotations

import os

# litellm fetches its cost map over the network at import unless told not to.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import asyncio  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
from typing import Any  # noqa: E402

import click  # noqa: E402


class VkrGroup(click.Group):
    """The root group: vkr's own errors, from any command or plugin, become a one-line
    message (secrets redacted) and exit code 1 instead of a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        from vkr_core.log import redact
        from vkr_core.schemas import VkrError

        try:
            return super().invoke(ctx)
        except VkrError as exc:
            raise click.ClickException(redact(str(exc))) from None


class ExitWith(click.ClickException):
    """A one-line message and one of the documented exit codes (vkr_core.batch.ExitCode)."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.exit_code = code


EXIT_CODES_HELP = """
\b
Exit codes:
  0    every video done
  1    bad input, or an error that stopped the run (message on stderr)
  2    a wrong command-line option
  3    finished, but some videos failed (RUN_DIR/failures.jsonl)
  4    --max-spend reached: work is left; rerun with a higher budget
  5    preflight: a model the run needs has no key or does not answer
  130  interrupted (Ctrl-C): rerun the same command to resume
"""


@click.group(cls=VkrGroup)
@click.version_option(package_name="vkr")
def cli() -> None:
    """vkr: verified video question-answer training data with chain-of-thought."""


def _skill_list(ctx: click.Context, param: click.Parameter, value: str | None) -> list[str] | None:
    if value is None:
        return None
    names = [name.strip() for name in value.split(",") if name.strip()]
    if not names:
        raise click.BadParameter("name at least one skill, e.g. VidR,KnowVid")
    return names


def pipeline_options(func: Any) -> Any:
    """The settings every command that runs the pipeline shares; they become a RunConfig."""
    options = [
        click.option(
            "--seed-bank", type=click.Path(dir_okay=False), help="Seed-example bank (jsonl)."
        ),
        click.option(
            "--seed", default=0, show_default=True, help="Run seed: model choice, seeds, frames."
        ),
        # The ranges repeat RunConfig's, so a bad value is a usage error naming the option.
        click.option(
            "--fps",
            default=0.2,
            show_default=True,
            type=click.FloatRange(min=0, min_open=True),
            help="Frame sampling rate (frames per second).",
        ),
        click.option(
            "--max-frames",
            default=64,
            show_default=True,
            type=click.IntRange(min=1),
            help="At most this many frames.",
        ),
        click.option(
            "--skills",
            callback=_skill_list,
            metavar="NAME,...",
            help="Generate only these skills (comma-separated) [default: every registered skill].",
        ),
        click.option(
            "--allow-stale", is_flag=True, help="Use eligibility entries of older prompt versions."
        ),
        click.option(
            "--force", is_flag=True, help="Reuse a run directory made with another config."
        ),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def outage_options(func: Any) -> Any:
    """Preflight and cool-down settings: they change no result, so no config snapshot."""
    options = [
        click.option(
            "--skip-preflight",
            is_flag=True,
            help="Do not check that every model answers before the first video "
            "(key variables are still checked).",
        ),
        click.option(
            "--cooldown",
            default=10.0,
            show_default=True,
            type=click.FloatRange(min=0, min_open=True),
            metavar="SECONDS",
            help="How long a model whose calls keep failing rests before it is tried again; "
            "doubles while it keeps failing (up to 10 minutes).",
        ),
    ]
    for option in reversed(options):
        func = option(func)
    return func


@cli.command(epilog=EXIT_CODES_HELP)
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
    from vkr_core.batch import ExitCode
    from vkr_core.config import RunConfig
    from vkr_core.log import configure_logging
    from vkr_core.plugins import get_plugin_manager
    from vkr_core.preflight import PreflightError
    from vkr_core.run import format_funnel, funnel, generate_videos
    from vkr_core.sources import place_in_root

    configure_logging(log_level)
    pm = get_plugin_manager()
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
        [record] = asyncio.run(generate_videos([video], run_dir, pool, config, pm, force))
    except PreflightError as exc:
        raise ExitWith(str(exc), ExitCode.PREFLIGHT) from None
    except KeyboardInterrupt:
        click.echo("interrupted: finished work is saved; run the same command to resume", err=True)
        sys.exit(ExitCode.INTERRUPTED)
    if record.status == "failed":
        raise ExitWith(f"video {video_id} failed: {record.failure}", ExitCode.VIDEOS_FAILED)
    gates = [g.name for g in pm.registry.gates()]
    click.echo(f"video {video_id}: {record.frames} frames")
    click.echo(format_funnel(funnel([record], gates)))
    click.echo(f"record: {run_dir}/records/{video_id}.json")


@cli.command("run", epilog=EXIT_CODES_HELP)
@click.option(
    "--videos",
    "manifest",
    required=True,
    type=click.Path(dir_okay=False),
    help="Manifest: jsonl with video_id, path, discipline, subject, knowledge_point.",
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
    help="Videos in flight at once (per-model limits come from the pool).",
)
@click.option(
    "--target-accepted",
    type=click.IntRange(min=1),
    help="Stop launching new videos once this many examples are accepted.",
)
@pipeline_options
@outage_options
@click.option(
    "--max-spend",
    type=click.FloatRange(min=0),
    metavar="USD",
    help="Stop starting videos and model calls once the run directory has spent this much "
    "(earlier invocations included); calls in flight still land. Rerun to go on.",
)
@click.option(
    "--strict-manifest", is_flag=True, help="Refuse to start if any manifest line is bad."
)
@click.option(
    "--retry-failed",
    is_flag=True,
    help="Process again videos that failed before (e.g. after replacing the file).",
)
@click.option("--no-progress", is_flag=True, help="No progress bar or progress lines.")
@click.option("--log-level", default="WARNING", show_default=True)
def run_command(
    manifest: str,
    video_root: str | None,
    pool: str,
    run_dir: str,
    concurrency: int,
    target_accepted: int | None,
    force: bool,
    strict_manifest: bool,
    no_progress: bool,
    log_level: str,
    **settings: Any,
) -> None:
    """Generate verified examples for every video of a manifest; resumable after any kill."""
    from vkr_core.batch import ExitCode
    from vkr_core.config import RunConfig
    from vkr_core.log import configure_logging
    from vkr_core.manifest import load_manifest
    from vkr_core.plugins import get_plugin_manager
    from vkr_core.preflight import PreflightError
    from vkr_core.run import format_funnel, funnel, run_manifest

    configure_logging(log_level)
    loaded = load_manifest(manifest, video_root)
    for problem in loaded.problems:
        click.echo(f"manifest {manifest}: {problem.reason}", err=True)
    if loaded.problems and strict_manifest:
        raise click.ClickException(f"{len(loaded.problems)} bad manifest line(s); nothing was run")
    pm = get_plugin_manager()
    config = RunConfig(video_root=loaded.video_root, **settings)
    try:
        counters = asyncio.run(
            run_manifest(
                loaded.videos,
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
    from corpus.report import build_report, summary_text, write_report

    gates = [g.name for g in pm.registry.gates()]
    click.echo(counters.line())
    # From the counts the run kept, not from its records: those are on disk only.
    click.echo(format_funnel(funnel(counters.funnel, gates)))
    # Every run leaves its report beside its records; `vkr report` rebuilds it any time.
    report = build_report(run_dir, gates)
    write_report(report, run_dir)
    click.echo(summary_text(report))
    failed = len(loaded.problems) + counters.failed
    if failed:
        click.echo(f"{failed} video(s) failed: see {run_dir}/failures.jsonl")
    if counters.stopped == "budget":
        raise ExitWith(
            f"--max-spend reached: {counters.total - counters.done - counters.failed} video(s) "
            "not finished; finished work is saved; rerun with a higher --max-spend (or without "
            "it) to go on",
            ExitCode.BUDGET,
        )
    if failed:
        sys.exit(ExitCode.VIDEOS_FAILED)


@cli.command("plugins")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def plugins_command(as_json: bool) -> None:
    """List loaded plugins and what each registers."""
    from vkr_core.plugins import describe, get_plugin_manager

    rows = describe(get_plugin_manager())
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    for row in rows:
        kind = "built-in" if row["builtin"] else "third-party"
        registers = "; ".join(f"{k}: {', '.join(v)}" for k, v in row["registers"].items())
        click.echo(f"{row['name']} ({kind})" + (f"  {registers}" if registers else ""))
        click.echo(f"    hooks: {', '.join(row['hooks'])}")


# --- commands added by other modules (keep one line each) ---
from cli_corpus import split as _split, export as _export; cli.add_command(_split); cli.add_command(_export)  # noqa: E402, E702, I001  # fmt: skip
from cli_decontam import decontam as _decontam; cli.add_command(_decontam)  # noqa: E402, E702, I001  # fmt: skip
from cli_report import report as _report; cli.add_command(_report)  # noqa: E402, E702, I001  # fmt: skip
from cli_qualify import qualify as _qualify; cli.add_command(_qualify)  # noqa: E402, E702, I001  # fmt: skip
from cli_probe import probe as _probe; cli.add_command(_probe)  # noqa: E402, E702, I001  # fmt: skip


def main() -> None:
    from vkr_core.log import redact
    from vkr_core.plugins import get_plugin_manager
    from vkr_core.schemas import VkrError

    try:
        pm = get_plugin_manager()
    except VkrError as exc:
        # Plugins load before click runs, so the root group cannot translate this one.
        click.ClickException(redact(str(exc))).show()
        sys.exit(1)
    pm.hook.vkr_register_commands(cli=cli)
    cli()


if __name__ == "__main__":
    main()
