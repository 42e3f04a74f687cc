"""`vkr report RUN_DIR`: what a run produced and what it cost, as tables, JSON, HTML and PNG.

Imported by cli.py at every start: library imports stay inside the command.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from vkr_core.hookspecs import hookimpl


def _known_gate_order(run_dir: Path) -> list[str] | None:
    """The gate order the run saved; for runs older than that, the installed plugins'
    order, or None when plugins do not load (the records' data decides)."""
    from cli_options import plugin_manager
    from graphs.generation import saved_gate_order
    from vkr_core.schemas import VkrError

    saved = saved_gate_order(run_dir)
    if saved:
        return saved
    try:
        return [gate.name for gate in plugin_manager().registry.gates()]
    except (VkrError, ImportError):
        return None


@click.command()
@click.argument("run_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    help="Folder for report.json, report.md, report.html and report.png [default: RUN_DIR].",
)
def report(run_dir: Path, out: Path | None) -> None:
    """Summarise RUN_DIR: funnel per skill, rejection reasons, spend per model and step."""
    from rich.console import Console

    from corpus.report import build_report, summary_renderables, write_report

    data = build_report(run_dir, gate_names=_known_gate_order(run_dir))
    paths = write_report(data, out or run_dir)
    console = Console(highlight=False)
    for renderable in summary_renderables(data):
        console.print(renderable)
    for warning in data["warnings"]:
        click.echo(f"warning: {warning}", err=True)
    click.echo("wrote " + ", ".join(str(p) for p in paths.values()))


@hookimpl
def vkr_register_commands(cli: Any) -> None:
    cli.add_command(report)
