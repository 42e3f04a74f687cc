"""Video sources: where videos and what is known about them come from.

Every command follows one rule for video paths: a record holds the video's path relative to
a declared video root (``vkr run --video-root``, by default the manifest's folder; ``vkr
generate --videos-dir``), with POSIX separators. The root is saved in the run's config, so a
corpus moved to another machine needs only the new root, never rewritten paths.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

from vkr_core.schemas import InputError, Strict, Video, VkrError

VIDEO_EXTENSIONS = (".mp4", ".mkv", ".mov", ".webm", ".avi", ".m4v")


class Source:
    """Resolves a video id to a local file and its metadata."""

    name: str = ""

    def resolve(self, video_id: str, **options: Any) -> Video:
        raise NotImplementedError

    def list(self, **options: Any) -> list[Video]:
        raise NotImplementedError


class SearchQuotaExhausted(VkrError):
    """A search source's quota is spent: nothing more can be asked until ``resets_at``."""

    def __init__(self, message: str, resets_at: datetime) -> None:
        super().__init__(message)
        self.resets_at = resets_at


class SearchKeyRefused(VkrError):
    """A search source refused the API key: no search can go on until it is fixed."""


class SearchQuota(Strict):
    """What a search source's quota stands at in a collection folder."""

    day: str
    spent: int
    limit: int
    resets_at: datetime
    # Every day this folder's searches spent, per request kind.
    units_by_method: dict[str, int]


class SearchSession(Protocol):
    """An open search: ``search`` returns a report with ``keywords`` (keyword -> found ids),
    ``candidates`` (each with ``video_id``, ``title``, ``description``, ``channel``,
    ``channel_id``, ``url``, ``license``, ``published_at``, ``duration_seconds``),
    ``rejected`` (``video_id``, ``reason``) and ``missing`` (ids)."""

    async def search(
        self, keywords: list[str], *, max_results: int, max_duration_seconds: int
    ) -> Any: ...


class Downloader(Protocol):
    """Downloads one candidate; the outcome has ``status`` ("downloaded", "already",
    "failed"), ``path``, ``reason``, ``message`` and ``licence`` (attribution text)."""

    def download(self, video_id: str, candidate: Any = None) -> Any: ...


class SearchSource(Source):
    """A source that finds videos by keyword and downloads them into a folder, paying a
    daily quota kept in the collection folder (so a rerun pays for nothing twice)."""

    def api_key_from_env(self) -> str:
        """The source's API key from the environment, registered as a secret; InputError
        when unset."""
        raise NotImplementedError

    def open_search(
        self,
        folder: str | Path,
        *,
        daily_quota: int,
        clock: Callable[[], datetime],
        api_base: str | None = None,
        api_key: str,
        state: str | None = None,
    ) -> AbstractAsyncContextManager[SearchSession]:
        """An open search charged to the quota kept in ``folder``, or, given ``state`` (the
        run's shared state URL), the one every driver of the collection shares. Raises
        SearchQuotaExhausted and SearchKeyRefused (or subclasses)."""
        raise NotImplementedError

    def downloader(
        self, folder: str | Path, *, url_template: str | None = None, min_interval: float = 2.0
    ) -> Downloader:
        raise NotImplementedError

    def quota(
        self,
        folder: str | Path,
        *,
        daily_quota: int,
        clock: Callable[[], datetime],
        state: str | None = None,
    ) -> SearchQuota:
        """Today's spend, from the ledger ``open_search`` with the same arguments charges."""
        raise NotImplementedError

    def describe_reset(self, resets_at: datetime) -> str:
        """When the quota resets, as the user reads it."""
        return f"{resets_at.astimezone():%Y-%m-%d %H:%M %Z}"


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
