"""`vkr seeds`: write and cross-review seed examples in the browser, export the seed bank.

Imported by cli.py at every start: library imports stay inside the commands.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

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
def serve(
    manifest: Path, seeds_dir: Path, target: int, port: int, host: str, annotator: str | None
) -> None:
    """Serve the seed page on 127.0.0.1 until Ctrl-C."""
    from experts.seeds import SeedsServer
    from vkr_core.plugins import get_plugin_manager

    server = SeedsServer(manifest, seeds_dir, get_plugin_manager(), host, port, target, annotator)
    click.echo(f"seeds {seeds_dir}: open {server.url}")
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


@hookimpl
def vkr_register_commands(cli: Any) -> None:
    cli.add_command(seeds)
