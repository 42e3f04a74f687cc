"""`vkr split` and `vkr export`: from accepted examples to files trainers load.

Imported by cli.py at every start: library imports stay inside the commands.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from vkr_core.hookspecs import hookimpl

# The paper's split: 201,156 of 315,537 examples in SFT (kept here so --help needs no import).
PAPER_SFT_SHARE = 201_156 / 315_537


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _parse_options(pairs: tuple[str, ...]) -> dict[str, str]:
    options: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise click.BadParameter(f"{pair!r} is not KEY=VALUE", param_hint="--option")
        options[key.strip()] = value
    return options


@click.command()
@click.argument(
    "run_dirs", nargs=-1, required=True, type=click.Path(file_okay=False, path_type=Path)
)
@click.option(
    "--out",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Folder for sft.jsonl, rl.jsonl and split.json.",
)
@click.option(
    "--sft-share",
    type=click.FloatRange(0.0, 1.0),
    default=PAPER_SFT_SHARE,
    show_default="0.6375, the paper's 201,156 of 315,537",
    help="Share of examples to put in the SFT set (the rest go to RL).",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Same seed, same split.")
@click.option(
    "--exclude-unfinished",
    is_flag=True,
    help="Leave out videos a stopped run has not finished (listed) instead of refusing.",
)
def split(
    run_dirs: tuple[Path, ...], out: Path, sft_share: float, seed: int, exclude_unfinished: bool
) -> None:
    """Split the accepted examples of RUN_DIRS by video into an SFT set and an RL set.

    Every video must be finished (each planned round has an outcome); an unfinished one is
    refused unless --exclude-unfinished, which leaves it out and lists it.
    """
    from corpus.split import split_run_dirs
    from vkr_core.store import SplitLayout

    manifest = split_run_dirs(
        list(run_dirs), out, sft_share=sft_share, seed=seed, exclude_unfinished=exclude_unfinished
    )
    for line in manifest.excluded_unfinished:
        click.echo(f"excluded unfinished video: {line}", err=True)
    total = manifest.sft.examples + manifest.rl.examples
    click.echo(
        f"SFT: {_count(manifest.sft.examples, 'example')} from "
        f"{_count(manifest.sft.videos, 'video')} ({manifest.sft_share:.4f} of {total}); "
        f"RL: {_count(manifest.rl.examples, 'example')} from {_count(manifest.rl.videos, 'video')}"
    )
    capped = manifest.open_ended_below_full_reward
    if capped:
        ids = ", ".join(capped[:5])
        more = len(capped) - 5
        click.echo(
            f"warning: {len(capped)} open-ended RL answers have fewer than two words ROUGE "
            f"can score, so even a perfect response earns less than full reward: {ids}"
            + (f" and {more} more (see {SplitLayout(out).manifest})" if more > 0 else ""),
            err=True,
        )
    written = SplitLayout(out)
    click.echo(f"wrote {written.sft}, {written.rl}, {written.manifest}")


@click.command()
@click.option(
    "--format",
    "format_name",
    required=True,
    help="Exporter name: videokr, llamafactory, verl, hf, eval, or a plugin's.",
)
@click.option(
    "--input",
    "input_dir",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="A folder written by `vkr split`.",
)
@click.option(
    "--out",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Folder for the exported files.",
)
@click.option(
    "--video-root",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    show_default="the root the split's runs recorded",
    help="Folder the video paths are relative to (where the run's video root is now); "
    "every video must be a file under it.",
)
@click.option(
    "--option",
    "-o",
    "option_pairs",
    multiple=True,
    metavar="KEY=VALUE",
    help="An exporter option (repeatable), e.g. -o part=all.",
)
def export(
    format_name: str,
    input_dir: Path,
    out: Path,
    video_root: Path | None,
    option_pairs: tuple[str, ...],
) -> None:
    """Export a split to the files a training or evaluation tool loads."""
    from cli_options import plugin_manager

    options = _parse_options(option_pairs)
    exporter = plugin_manager().registry.get("exporter", format_name)
    if video_root is None:
        from corpus.exporters import recorded_video_roots

        roots = sorted(set(recorded_video_roots(input_dir).values()))
        if len(roots) == 1:
            click.echo(f"video root: {roots[0]} (recorded by the run; --video-root to change)")
    paths = exporter.export(input_dir, out, video_root=video_root, **options)
    for path in paths:
        click.echo(f"wrote {path}")


@hookimpl
def vkr_register_commands(cli: Any) -> None:
    cli.add_command(split)
    cli.add_command(export)
