"""`vkr bank build|show|stats`: the knowledge bank, from expert-written lectures to points.

Imported by cli.py at every start: library imports stay inside the commands.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from vkr_core.hookspecs import hookimpl


@click.group()
def bank() -> None:
    """Knowledge bank: subjects -> courses -> lectures -> knowledge points."""


@bank.command()
@click.option(
    "--bank",
    "bank_file",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="The bank: YAML (subjects -> courses -> lectures) or jsonl (a lecture a line).",
)
@click.option("--pool", required=True, type=click.Path(dir_okay=False), help="Model pool YAML.")
@click.option(
    "--out",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Folder for the built bank (bank.json, knowledge_points.jsonl) and its run files.",
)
@click.option("--concurrency", type=click.IntRange(1, 256), default=4, show_default=True)
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def build(bank_file: Path, pool: str, out: Path, concurrency: int, no_progress: bool) -> None:
    """Ask a model for the knowledge points of every lecture; a rerun pays for nothing done."""
    from knowledge.built import build_bank
    from vkr_core.batch import ExitCode

    result = build_bank(bank_file, pool, out, concurrency=concurrency, progress=not no_progress)
    lectures = result.bank.lectures
    c = result.counters
    click.echo(
        f"bank: {len(lectures) - len(result.failed)}/{len(lectures)} lecture(s) built, "
        f"{len(result.bank.points())} knowledge point(s) | calls paid {c.paid_calls}, "
        f"cached {c.cached_calls} | ${c.spend_usd:.4f}"
    )
    click.echo("wrote " + ", ".join(str(p) for p in result.paths))
    if result.failed:
        click.echo(f"{len(result.failed)} lecture(s) not built: see `vkr bank stats {out}`")
        sys.exit(ExitCode.VIDEOS_FAILED)


@bank.command()
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option("--subject", help="Only this subject (its name, any case).")
def show(directory: Path, subject: str | None) -> None:
    """Print a built bank: lectures and their knowledge points with ids and definitions."""
    from knowledge.built import load_built_bank, show_lines

    for line in show_lines(load_built_bank(directory), subject):
        click.echo(line)


@bank.command()
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
def stats(directory: Path) -> None:
    """Counts per discipline, subject and course; points per lecture; lectures not built."""
    from knowledge.built import load_built_bank, stats_lines

    for line in stats_lines(load_built_bank(directory)):
        click.echo(line)


@bank.command()
@click.argument("path", type=click.Path(dir_okay=False, path_type=Path))
def example(path: Path) -> None:
    """Write the worked example bank (2 subjects, 5 lectures) to PATH, to start from."""
    from knowledge.loader import example_bank_path
    from vkr_core.files import atomic_write
    from vkr_core.schemas import InputError

    if path.exists():
        raise InputError(f"{path} exists: name a new file")
    atomic_write(path, example_bank_path().read_text(encoding="utf-8"))
    click.echo(f"wrote {path}: edit it, then `vkr bank build --bank {path} ...`")


@bank.command()
def subjects() -> None:
    """The disciplines and subjects shipped with vkr (a reconstruction: see the file)."""
    from knowledge.loader import data_path, load_taxonomy

    taxonomy = load_taxonomy()
    for discipline in taxonomy.disciplines:
        click.echo(f"{discipline.name} ({len(discipline.subjects)})")
        for subject in discipline.subjects:
            click.echo(f"  {subject}")
    click.echo(f"from {data_path('disciplines.yaml')}")


@hookimpl
def vkr_register_commands(cli: Any) -> None:
    cli.add_command(bank)
