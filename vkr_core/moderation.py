"""What a pipeline needs from an image moderation provider, whichever service it calls.

A pipeline finds the moderator among the loaded providers (:func:`find_image_moderator`),
has it check its settings before anything is paid for, and opens one
:class:`ImageModeration` for the run: cached, retried and recorded by the provider's plugin.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from vkr_core.schemas import CallRecord, Frame, InputError


class ModerationVerdict(Protocol):
    """A decision on one video: ``safe`` and why."""

    @property
    def safe(self) -> bool: ...

    @property
    def reason(self) -> str: ...


class ImageModeration(Protocol):
    """An open moderation for one run."""

    async def moderate_video(
        self, video_id: str, frames: Sequence[Frame], seed: int = 0
    ) -> ModerationVerdict: ...

    def write_record(self, run_dir: str | Path, verdict: Any) -> Path:
        """Keep the verdict with its per-image scores in the run directory."""
        ...

    async def aclose(self) -> None: ...


@runtime_checkable
class ImageModerator(Protocol):
    """A provider that moderates images: the capability a pipeline looks for."""

    name: str

    def check_moderation(self, settings: dict[str, Any]) -> None:
        """Raise InputError when ``settings`` (thresholds, key, endpoint) cannot work."""
        ...

    def image_moderation(
        self,
        settings: dict[str, Any],
        cache: Any,
        on_record: Callable[[CallRecord], None] | None = None,
    ) -> ImageModeration: ...


def find_image_moderator(registry: Any, name: str) -> ImageModerator:
    """The image moderator named ``name`` among the loaded providers; a unique prefix before
    a ``-`` (``acme`` for ``acme-vision``) names it too."""
    moderators = {
        n: p for n, p in getattr(registry, "providers", {}).items() if isinstance(p, ImageModerator)
    }
    if name in moderators:
        return moderators[name]
    matches = [n for n in moderators if n.startswith(f"{name}-")]
    if len(matches) == 1:
        return moderators[matches[0]]
    raise InputError(
        f"no image moderation provider named {name!r} is loaded (loaded: "
        f"{', '.join(sorted(moderators)) or 'none'})"
    )
