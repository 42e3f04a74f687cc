"""Video sources: where videos and what is known about them come from.

Every command follows one rule for video paths: a record holds the video's path relative to
a declared video root (``vkr run --video-root``, by default the manifest's folder; ``vkr
generate --videos-dir``), with POSIX separators. The root is saved in the run's config, so a
corpus moved to another machine needs only the new root, never rewritten paths.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from vkr_core.schemas import InputError, Video

VIDEO_EXTENSIONS = (".mp4", ".mkv", ".mov", ".webm", ".avi", ".m4v")


class Source:
    """Resolves a video id to a local file and its metadata."""

    name: str = ""

    def resolve(self, video_id: str, **options: Any) -> Video:
        raise NotImplementedError

    def list(self, **options: Any) -> list[Video]:
        raise NotImplementedError


def _climbs_out(relative: str) -> bool:
    return relative in (".", "..") or relative.startswith(".." + os.sep)


def path_under_root(path: str | Path, root: str | Path) -> str | None:
    """``path`` relative to ``root`` with POSIX separators, or None when it is not under it.

    The path as named is tried first, so a link inside the root that points elsewhere still
    counts as inside; then both resolved, so a root reached through a link holds its files.
    """
    for target, base in (
        (os.path.abspath(path), os.path.abspath(root)),
        (os.path.realpath(path), os.path.realpath(root)),
    ):
        try:
            relative = os.path.relpath(target, base)
        except ValueError:  # another drive (Windows): never under the root
            continue
        if not _climbs_out(relative):
            return Path(relative).as_posix()
    return None


def video_path_in_root(path: str | Path, root: str | Path | None) -> str:
    """The path a record holds for the file ``path``: relative to ``root``.

    Without a root (a Video built by hand) the file's own folder stands in: its name.
    """
    if root is None:
        return Path(path).name
    relative = path_under_root(path, root)
    if relative is None:
        raise InputError(
            f"video file {str(path)!r} is outside the video root {str(root)!r}: "
            "choose a video root that holds every video"
        )
    return relative


def place_in_root(video: Video, root: str | Path) -> Video:
    """The video with its ``video_path`` relative to ``root``; InputError if outside it."""
    return video.model_copy(update={"video_path": video_path_in_root(video.path, root)})
