"""Options and exit codes the commands that run a pipeline share (`vkr run`, `vkr generate`,
`vkr qualify inputs`): one definition each, so the commands cannot drift apart."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import click

if TYPE_CHECKING:
    from vkr_core.plugins import VkrPluginManager

# Where a command finds the invocation's plugin manager (click shares ``meta`` with every
# subcommand's context).
PLUGIN_MANAGER_KEY = "vkr.plugin_manager"


def plugin_manager() -> VkrPluginManager:
    """The plugin manager of this `vkr` invocation: the one the root command loaded to
    register the commands (a second load cost ~50 ms a start), or a fresh one, kept for the
    invocation, when a command runs outside the root (click's test runner on a subcommand)."""
    from vkr_core.plugins import get_plugin_manager

    ctx = click.get_current_context(silent=True)
    if ctx is None:
        return get_plugin_manager()
    pm = ctx.meta.get(PLUGIN_MANAGER_KEY)
    if pm is None:
        pm = ctx.meta[PLUGIN_MANAGER_KEY] = get_plugin_manager()
    return pm  # type: ignore[no-any-return]


class ExitWith(click.ClickException):
    """A one-line message and one of the documented exit codes (vkr_core.batch.ExitCode)."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        # click declares exit_code on the class; it reads it from the instance it caught.
        self.exit_code = code  # type: ignore[misc]


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


def _skill_list(ctx: click.Context, param: click.Parameter, value: str | None) -> list[str] | None:
    if value is None:
        return None
    names = [name.strip() for name in value.split(",") if name.strip()]
    if not names:
        raise click.BadParameter("name at least one skill, e.g. VidR,KnowVid")
    return names


def _state_url(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    if value is None:
        return None
    scheme, sep, rest = value.partition("://")
    if not sep or not scheme or not rest:
        # Never echo the value: it may hold a password.
        raise click.BadParameter("give a URL such as postgresql://user@host:5432/dbname")
    return value


# How a video's frames are sampled (`vkr run`, `vkr seeds serve`). The ranges repeat
# RunConfig's, so a bad value is a usage error naming the option.
FRAME_OPTIONS = [
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
]


def frame_options(func: Any) -> Any:
    """--fps and --max-frames, as `vkr run` takes them."""
    for option in reversed(FRAME_OPTIONS):
        func = option(func)
    return func


def pipeline_options(func: Any) -> Any:
    """The settings every command that runs the pipeline shares; they become a RunConfig."""
    options = [
        click.option(
            "--seed-bank", type=click.Path(dir_okay=False), help="Seed-example bank (jsonl)."
        ),
        click.option(
            "--seed", default=0, show_default=True, help="Run seed: model choice, seeds, frames."
        ),
        *FRAME_OPTIONS,
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
        click.option(
            "--state",
            callback=_state_url,
            metavar="URL",
            help="Keep checkpoints, the call cache and item claims in this database "
            "(postgresql://user[:password]@host:port/db; needs vkr[postgres]) instead of the "
            "run directory, so several drivers can run the same manifest. The password is "
            "never stored: give it in the URL each time, or in PGPASSWORD.",
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


def engine_options(func: Any) -> Any:
    """What runs the items: the local asyncio engine, or Ray (they change no result)."""
    options = [
        click.option(
            "--engine",
            default="local",
            show_default=True,
            metavar="NAME",
            help="What runs the items: local (asyncio in this process) or ray (a Ray "
            "cluster's workers; pip install 'vkr[ray]').",
        ),
        click.option(
            "--ray-address",
            metavar="ADDRESS",
            help="With --engine ray: the cluster to join (host:port of its head) [default: "
            "$RAY_ADDRESS, else the Ray `ray start` started on this machine, else a new local "
            "Ray for this run].",
        ),
        click.option(
            "--workers",
            type=click.IntRange(min=1),
            help="With --engine ray: worker processes, --concurrency split across them "
            "[default: one per CPU of the cluster, at most --concurrency].",
        ),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def engine_settings(
    engine: str, ray_address: str | None, workers: int | None, concurrency: int
) -> dict[str, Any]:
    """The RunConfig fields the engine options set; a Ray option without --engine ray is a
    usage error (it would be silently ignored)."""
    if engine != "ray":
        for name, value in (("--ray-address", ray_address), ("--workers", workers)):
            if value is not None:
                raise click.UsageError(f"{name} needs --engine ray")
    if workers is not None and workers > concurrency:
        # --concurrency is the whole cluster's, split across the workers.
        raise click.UsageError(
            f"--workers {workers} is more than --concurrency {concurrency}: each worker needs "
            "at least one item in flight"
        )
    options = {"address": ray_address, "workers": workers} if engine == "ray" else {}
    return {"executor": engine, "executor_options": options}
