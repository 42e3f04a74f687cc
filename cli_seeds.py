"""`vkr seeds`: write and cross-review seed examples in the browser, export the seed bank.

Imported by cli.py at every start: library imports stay inside the commands.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from cli_options import frame_options
from vkr_core.hookspecs import hookimpl


@click.group()
def seeds() -> None:
    """Seed examples: experts write them on a video's frames, a second one reviews them."""


@seeds.command()
@click.option(
    "--videos",
    "manifest",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Video manifest (jsonl, as vkr run --inputs reads).",
)
@click.option(
    "--bank",
    "seeds_dir",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Folder of the seeds (seeds.sqlite, sampled frames); created if missing.",
)
@click.option(
    "--target",
    default=150,
    show_default=True,
    help="Approved seeds wanted per discipline and skill.",
)
@click.option("--port", default=8761, show_default=True, help="Port on 127.0.0.1 (0: any free).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Loopback only.")
@click.option("--annotator", help="Your name, recorded with every seed you save.")
@frame_options
def serve(
    manifest: Path,
    seeds_dir: Path,
    target: int,
    port: int,
    host: str,
    annotator: str | None,
    fps: float,
    max_frames: int,
) -> None:
    """Serve the seed page on 127.0.0.1 until Ctrl-C.

    The frames an expert writes on are sampled as `vkr run` samples them with the same
    --fps and --max-frames; each seed records them.
    """
    from cli_options import plugin_manager
    from experts.seeds import SeedsServer, sampling_text

    server = SeedsServer(
        manifest, seeds_dir, plugin_manager(), host, port, target, annotator, fps, max_frames
    )
    click.echo(f"seeds {seeds_dir}: open {server.url}")
    click.echo(f"frames: {sampling_text(server.app.sampling)} (as vkr run samples them)")
    for problem in server.app.problems:
        click.echo(f"left out of the page: {problem}", err=True)
    click.echo("seeds are saved as you write them; press Ctrl-C to stop")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()


@seeds.command("export")
@click.argument("seeds_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--out",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Seed-bank jsonl for vkr run --seed-bank.",
)
def export_command(seeds_dir: Path, out: Path) -> None:
    """Write SEEDS_DIR's approved seeds as the seed bank vkr run --seed-bank reads."""
    from experts.seeds import export_bank

    n = export_bank(seeds_dir, out)
    click.echo(f"wrote {n} approved seed{'' if n == 1 else 's'} to {out}")


_FORMAT = click.Choice(["labelstudio", "argilla"])


@seeds.command("tasks")
@click.argument("seeds_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--format", "fmt", default="labelstudio", show_default=True, type=_FORMAT)
@click.option(
    "--out",
    required=True,
    type=click.Path(path_type=Path),
    help="Label Studio: tasks JSON (config XML beside it). Argilla: an empty folder.",
)
@click.option(
    "--frame-url-prefix",
    default="",
    help="Put before each frame's SEEDS_DIR-relative path, e.g. Label Studio's "
    "'/data/local-files/?d=seeds/'.",
)
def tasks_command(seeds_dir: Path, fmt: str, out: Path, frame_url_prefix: str) -> None:
    """Write SEEDS_DIR's pending seeds for a second annotator in Label Studio or Argilla."""
    from experts.seeds_interchange import export_tasks

    n = export_tasks(seeds_dir, out, frame_url_prefix, fmt)
    click.echo(f"wrote {n} pending seed{'' if n == 1 else 's'} to {out}")
    if fmt == "labelstudio":
        click.echo(f"labelling config: {out.with_suffix('.config.xml')}")


@seeds.command("import")
@click.argument("seeds_dir", type=click.Path(file_okay=False, path_type=Path))
@click.argument("export", type=click.Path(path_type=Path))
@click.option("--format", "fmt", default="labelstudio", show_default=True, type=_FORMAT)
def import_command(seeds_dir: Path, export: Path, fmt: str) -> None:
    """Apply the approvals and revisions of a Label Studio JSON export or an Argilla
    dataset folder (all or nothing)."""
    from cli_options import plugin_manager
    from experts.seeds_interchange import import_reviews

    skills = sorted(plugin_manager().registry.skills)
    done = import_reviews(seeds_dir, export, skills, fmt)
    click.echo(f"imported {done['approved']} approvals and {done['revised']} revisions")


@hookimpl
def vkr_register_commands(cli: Any) -> None:
    cli.add_command(seeds)
