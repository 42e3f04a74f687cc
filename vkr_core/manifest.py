"""The video manifest of `vkr run`: jsonl, one video per line, validated before any work.

Fields: ``video_id``, ``path`` (absolute, or relative to the manifest's folder),
``discipline``, ``subject``, ``knowledge_point`` (a term, or ``{term, definition}``),
``title``, ``description``. A bad line is reported with its line number and skipped; it
never stops the other videos.

Each video's ``video_path`` (what records and exports hold) is its file's path relative to
the video root, by default the manifest's folder. A file outside the root is a bad line:
the root is never widened to fit, because a root that follows the manifest's contents would
rename every recorded path when one line changes, and silently become ``/`` for scattered
files.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import ValidationError

from vkr_core.errors import describe_validation_error
from vkr_core.files import JsonlProblem, read_jsonl
from vkr_core.log import get_logger
from vkr_core.schemas import InputError, KnowledgePoint, Video, check_video_id
from vkr_core.sources import path_under_root

log = get_logger("vkr.manifest")


@dataclass
class ManifestProblem:
    line: int
    video_id: str | None
    path: str | None
    reason: str


@dataclass
class Manifest:
    source: str
    # Absolute: the folder every video_path is relative to (saved in the run's config).
    video_root: str = ""
    videos: list[Video] = field(default_factory=list)
    problems: list[ManifestProblem] = field(default_factory=list)
    # Line number -> {field: length before the cut} for videos whose metadata was capped.
    truncated: dict[int, dict[str, int]] = field(default_factory=dict)


def load_manifest(path: str | Path, video_root: str | Path | None = None) -> Manifest:
    """Read and check a manifest; ``video_root`` defaults to the manifest's folder."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"manifest not found: {p}")
    root = os.path.abspath(p.parent if video_root is None else video_root)
    if not os.path.isdir(root):
        raise InputError(f"video root not found: {root} (it must be an existing folder)")
    manifest = Manifest(source=str(p), video_root=root)
    seen: dict[str, int] = {}

    def unreadable(line: JsonlProblem) -> None:
        manifest.problems.append(
            ManifestProblem(line.line, None, None, f"line {line.line} is {line.reason}")
        )

    for number, data in read_jsonl(p, on_problem=unreadable):

        def problem(
            reason: str,
            video_id: str | None = None,
            video_path: str | None = None,
            line: int = number,
        ) -> None:
            manifest.problems.append(ManifestProblem(line, video_id, video_path, reason))

        video_id = data.get("video_id")
        raw_path = data.get("path")
        if not isinstance(video_id, str) or not video_id:
            problem(f"line {number} has no video_id", None, raw_path)
            continue
        try:
            check_video_id(video_id)
        except InputError as exc:
            problem(f"line {number}: {exc}", video_id, raw_path)
            continue
        if video_id in seen:
            problem(
                f"line {number}: duplicate video id {video_id!r} (first on line {seen[video_id]})",
                video_id,
                raw_path,
            )
            continue
        seen[video_id] = number
        if not isinstance(raw_path, str) or not raw_path:
            problem(f"line {number}: video {video_id!r} has no path", video_id)
            continue
        video_path = Path(raw_path)
        if not video_path.is_absolute():
            video_path = p.parent / video_path
        if not video_path.is_file():
            problem(f"line {number}: video file not found: {video_path}", video_id, str(video_path))
            continue
        relative = path_under_root(video_path, root)
        if relative is None:
            problem(
                f"line {number}: video file {os.path.abspath(video_path)} is outside the video "
                f"root {root}: pass --video-root with a folder that holds every video",
                video_id,
                str(video_path),
            )
            continue
        given = data.get("video_path")
        if given is not None and given != relative:
            problem(
                f"line {number}: video_path {given!r} is not the file's path under the video "
                f"root ({relative!r}): drop the field, vkr derives it from path",
                video_id,
                str(video_path),
            )
            continue
        kp = data.get("knowledge_point")
        if isinstance(kp, str):
            data["knowledge_point"] = KnowledgePoint(term=kp)
        data["path"] = str(video_path.resolve())
        data["video_path"] = relative
        try:
            video = Video.model_validate(data)
        except ValidationError as exc:
            problem(f"line {number}: {describe_validation_error(exc)}", video_id, str(video_path))
            continue
        manifest.videos.append(video)
        if video.truncated:
            manifest.truncated[number] = video.truncated
            log.info(
                "metadata cut to its cap", line=number, video_id=video_id, fields=video.truncated
            )
    if manifest.truncated:
        # One line for the run, not one per video: a scraped manifest may have thousands.
        lines = sorted(manifest.truncated)
        log.warning(
            "metadata longer than its cap was cut (the prompts mark it truncated)",
            manifest=str(p),
            videos=len(lines),
            lines=lines[:10],
            fields=sorted({name for cut in manifest.truncated.values() for name in cut}),
        )
    return manifest
