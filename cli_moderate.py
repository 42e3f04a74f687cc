"""`vkr moderate FRAMES_OR_VIDEO...`: is each image, or each video (4 random frames), safe?

Imported by cli.py at every start: library imports stay inside the command.
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
from pathlib import Path
from typing import Any

import click

from vkr_core.hookspecs import hookimpl
from vkr_core.store import RunLayout

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif"})


def _item_id(path: Path) -> str:
    """A safe id for a file: its name's safe characters and a hash of its full path."""
    stem = re.sub(r"[^A-Za-z0-9_.-]", "_", path.stem).strip("._-")[:60] or "file"
    digest = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:8]
    return f"{stem}-{digest}"


def _threshold(values: tuple[str, ...]) -> dict[str, float]:
    thresholds: dict[str, float] = {}
    for value in values:
        category, sep, number = value.partition("=")
        try:
            thresholds[category.strip()] = float(number)
        except ValueError:
            sep = ""
        if not sep or not category.strip():
            raise click.BadParameter(
                f"{value!r}: write CATEGORY=NUMBER, e.g. Violence=6", param_hint="--threshold"
            )
    return thresholds


@click.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--provider",
    default="azure",
    show_default=True,
    help="Moderator: azure (Azure AI Content Safety), openai (omni-moderation), or a "
    "plugin's moderator name.",
)
@click.option("--endpoint", help="Azure resource endpoint or OpenAI API base [default: from env].")
@click.option("--api-key-env", help="Environment variable holding the key [default: provider's].")
@click.option("--model", help="OpenAI moderation model [default: omni-moderation-latest].")
@click.option(
    "--threshold",
    "thresholds",
    multiple=True,
    metavar="CATEGORY=NUMBER",
    help="Flag at or over this score (Azure severity 0-7, OpenAI 0-1); repeatable.",
)
@click.option(
    "--frames", default=4, show_default=True, type=click.IntRange(1, 32), help="Frames per video."
)
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the frames picked.")
@click.option(
    "--cache",
    "cache_dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Cache of scores and sampled frames [default: ~/.cache/vkr/moderation].",
)
@click.option(
    "--records",
    "records_dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Also write each decision's record to RECORDS/moderation/<id>.json.",
)
def moderate(
    paths: tuple[Path, ...],
    provider: str,
    endpoint: str | None,
    api_key_env: str | None,
    model: str | None,
    thresholds: tuple[str, ...],
    frames: int,
    seed: int,
    cache_dir: Path | None,
    records_dir: Path | None,
) -> None:
    """Moderate images, or videos by FRAMES random frames each, and print each decision.

    Exits 3 when a file could not be moderated (it is named, the others are decided), 1 when
    the moderator refused the key or did not answer.
    """
    import asyncio

    from cli_options import plugin_manager
    from plugins.providers.moderation import (
        ImageInput,
        ImageModeration,
        ModerationRecord,
        find_moderator,
        open_cache,
        parse_settings,
        write_record,
    )
    from vkr_core.log import register_env_secrets
    from vkr_core.schemas import InputError
    from vkr_core.video import sample_frames

    register_env_secrets([api_key_env] if api_key_env else [])
    pm = plugin_manager()
    moderator = find_moderator(pm.registry, provider)
    settings = parse_settings(
        {
            "provider": moderator.name,
            "frames_per_video": frames,
            "endpoint": endpoint,
            "api_key_env": api_key_env,
            "model": model,
            "thresholds": _threshold(thresholds),
        },
        where="moderation options",
    )
    root = cache_dir or Path(os.path.expanduser("~/.cache/vkr/moderation"))
    cache = open_cache(root / "scores")

    async def decide(moderation: ImageModeration, path: Path) -> ModerationRecord:
        if not path.is_file():
            raise InputError(f"no such file: {path}")
        item_id = _item_id(path)
        if path.suffix.lower() in IMAGE_SUFFIXES:
            return await moderation.moderate_images(item_id, [ImageInput.from_file(path)])
        # One frame a second, at most 64 spread over a long video: the random pick has the
        # whole video to draw from, even a short clip.
        sampled = await asyncio.to_thread(
            sample_frames, path, RunLayout(root).frames(item_id), 1.0, 64, pm=pm
        )
        return await moderation.moderate_video(item_id, sampled, seed)

    async def run() -> int:
        failed = 0
        async with ImageModeration(moderator, settings, cache) as moderation:
            for path in paths:
                try:
                    record = await decide(moderation, path)
                except InputError as exc:
                    # A bad file is this file's problem: say so and go on with the others.
                    # A refused key or a dead endpoint (ModerationError) stops everything.
                    failed += 1
                    click.echo(f"ERROR   {path}  ({exc})")
                    continue
                if records_dir is not None:
                    write_record(records_dir, record)
                click.echo(f"{'safe  ' if record.safe else 'UNSAFE'}  {path}  ({record.reason})")
        return failed

    try:
        failed = asyncio.run(run())
    finally:
        cache.close()
    if failed:
        from vkr_core.batch import ExitCode

        sys.exit(ExitCode.VIDEOS_FAILED)


@hookimpl
def vkr_register_commands(cli: Any) -> None:
    cli.add_command(moderate)
