"""The video manifest of `vkr run`: jsonl, one video per line, validated before any work.

Fields: ``video_id``, ``path`` (absolute, or relative to the manifest's folder),
``discipline``, ``subject``, ``knowledge_point`` (a term, or ``{term, definition}``),
``title``, ``description``. A bad line is reported with its line number and skipped; it
never stops the other videos.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import ValidationError

from vkr_core.schemas import InputError, KnowledgePoint, Video, check_video_id


@dataclass
class ManifestProblem:
    line: int
    video_id: str | None
    path: str | None
    reason: str


@dataclass
class Manifest:
    source: str
    videos: list[Video] = field(default_factory=list)
    problems: list[ManifestProblem] = field(default_factory=list)


def load_manifest(path: str | Path) -> Manifest:
    p = Path(path)
    if not p.is_file():
        raise InputError(f"manifest not found: {p}")
    manifest = Manifest(source=str(p))
    seen: dict[str, int] = {}
    for number, line in enumerate(p.read_text().splitlines(), start=1):
        if not line.strip():
            continue

        def problem(
            reason: str,
            video_id: str | None = None,
            video_path: str | None = None,
            line: int = number,
        ) -> None:
            manifest.problems.append(ManifestProblem(line, video_id, video_path, reason))

        try:
            data = json.loads(line)
        except json.JSONDecodeError as exc:
            problem(f"line {number} is not JSON: {exc.msg}")
            continue
        if not isinstance(data, dict):
            problem(f"line {number} is not a JSON object")
            continue
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
        kp = data.get("knowledge_point")
        if isinstance(kp, str):
            data["knowledge_point"] = KnowledgePoint(term=kp)
        data["path"] = str(video_path.resolve())
        if "video_path" not in data:
            data["video_path"] = raw_path if not Path(raw_path).is_absolute() else video_path.name
        try:
            manifest.videos.append(Video.model_validate(data))
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(str(x) for x in err["loc"])
            problem(f"line {number}: {where}: {err['msg']}", video_id, str(video_path))
    return manifest
