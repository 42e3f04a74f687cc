"""`vkr probe`: single-frame probing of an evaluation set (the paper's Table 2 filter).

Imported by cli.py at every start: library imports stay inside the command.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from cli_options import ExitWith, outage_options
from vkr_core.hookspecs import hookimpl


def _model_names(value: str | None) -> list[str] | None:
    if value is None:
        return None
    names = [name.strip() for name in value.split(",") if name.strip()]
    if not names:
        raise click.BadParameter("give at least one model name", param_hint="--models")
    return names


class _Progress:
    """A progress bar on a terminal, nothing elsewhere (logs, CI)."""

    def __init__(self) -> None:
        self.bar: Any = None
        self.task: Any = None

    def __enter__(self) -> _Progress:
        if sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

            self.bar = Progress(
                TextColumn("[bold]vkr probe"),
                BarColumn(),
                MofNCompleteColumn(),
                console=Console(stderr=True),
                transient=True,
            )
            self.bar.__enter__()
        return self

    def update(self, done: int, total: int) -> None:
        if self.bar is None:
            return
        if self.task is None:
            self.task = self.bar.add_task("trials", total=total)
        self.bar.update(self.task, completed=done)

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.__exit__(*exc)


PROBE_EXIT_CODES_HELP = """
\b
Exit codes:
  0    probed (questions whose videos failed are in OUT/unprobed.jsonl)
  1    bad input, or an error that stopped the probe (message on stderr)
  2    a wrong command-line option
  5    preflight: a probe model or the judge has no key or does not answer
  130  interrupted (Ctrl-C): rerun the same command to resume
"""


@click.command(epilog=PROBE_EXIT_CODES_HELP)
@click.option(
    "--eval",
    "eval_file",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Evaluation set, VideoKR-Eval style jsonl (id, video_path, question, options, "
    "problem_type, solution, dataset, subject).",
)
@click.option(
    "--videos-root",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Folder the eval file's video_path values are relative to.",
)
@click.option(
    "--pool",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Model pool YAML.",
)
@click.option(
    "--out",
    "out_dir",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Output folder: trials, kept, filtered, report, frames and the call cache.",
)
@click.option(
    "--models",
    help="Comma-separated probe models [default: the first 3 eligible for single_frame_probe].",
)
@click.option(
    "--trials",
    default=3,
    show_default=True,
    type=click.IntRange(min=1),
    help="Trials per question and model, each with its own random frame.",
)
@click.option("--seed", default=0, show_default=True, help="Chooses each trial's frame.")
@click.option(
    "--concurrency",
    default=8,
    show_default=True,
    type=click.IntRange(min=1),
    help="Model calls in flight at once (per-model limits come from the pool).",
)
@click.option(
    "--judge",
    help="Pool model that decides whether open-ended answers match "
    "[default: none, open-ended questions are kept unscored].",
)
@click.option(
    "--frames-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Where sampled frames go, reusable across probes [default: OUT/frames].",
)
@click.option(
    "--allow-stale", is_flag=True, help="Use eligibility entries of older prompt versions."
)
@outage_options
@click.option("--log-level", default="WARNING", show_default=True)
def probe(
    eval_file: Path,
    videos_root: Path,
    pool: Path,
    out_dir: Path,
    models: str | None,
    trials: int,
    seed: int,
    concurrency: int,
    judge: str | None,
    frames_dir: Path | None,
    allow_stale: bool,
    skip_preflight: bool,
    cooldown: float,
    log_level: str,
) -> None:
    """Find evaluation questions answerable from one random frame; keep only the others."""
    import asyncio

    from corpus.probe import ProbeOptions, run_probe
    from vkr_core.batch import ExitCode
    from vkr_core.log import configure_logging, redact
    from vkr_core.preflight import PreflightError
    from vkr_core.schemas import VkrError

    configure_logging(log_level)
    options = ProbeOptions(
        models=_model_names(models),
        trials=trials,
        seed=seed,
        concurrency=concurrency,
        judge=judge,
        frames_dir=frames_dir,
        allow_stale=allow_stale,
        skip_preflight=skip_preflight,
        cooldown=cooldown,
    )
    try:
        with _Progress() as progress:
            result = run_probe(
                eval_file, videos_root, pool, out_dir, options, on_progress=progress.update
            )
    except PreflightError as exc:
        raise ExitWith(redact(str(exc)), ExitCode.PREFLIGHT) from None
    except VkrError as exc:
        raise click.ClickException(redact(str(exc))) from None
    except (KeyboardInterrupt, asyncio.CancelledError):
        click.echo(
            "interrupted: answered calls are cached; run the same command to resume", err=True
        )
        sys.exit(ExitCode.INTERRUPTED)
    click.echo(result.paths["report_md"].read_text(), nl=False)
    for note in result.report["notes"]:
        click.echo(f"note: {note}", err=True)
    click.echo("wrote " + ", ".join(str(p) for p in result.paths.values()))


@hookimpl
def vkr_register_commands(cli: Any) -> None:
    cli.add_command(probe)
