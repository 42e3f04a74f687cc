"""Video sources: where videos and what is known about them come from."""

from __future__ import annotations

from typing import Any

from vkr_core.schemas import Video

VIDEO_EXTENSIONS = (".mp4", ".mkv", ".mov", ".webm", ".avi", ".m4v")


class Source:
    """Resolves a video id to a local file and its metadata."""

    name: str = ""

    def resolve(self, video_id: str, **options: Any) -> Video:
        raise NotImplementedError

    def list(self, **options: Any) -> list[Video]:
        raise NotImplementedError
