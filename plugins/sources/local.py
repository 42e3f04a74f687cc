"""The local-folder source: VIDEOS_DIR/<video_id>.<ext>, with optional <video_id>.json metadata.

The metadata sidecar may hold discipline, subject, knowledge_point ({term, definition}),
title and description; options given on the command line win over it. VIDEOS_DIR is the
video root: the record's video_path is the file's path under it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from vkr_core.errors import describe_validation_error
from vkr_core.hookspecs import hookimpl
from vkr_core.schemas import InputError, KnowledgePoint, Video, check_video_id
from vkr_core.sources import VIDEO_EXTENSIONS, Source, video_path_in_root


class LocalFolderSource(Source):
    name = "local"

    def _find(self, video_id: str, videos_dir: Path) -> Path:
        matches = [
            p
            for p in sorted(videos_dir.glob(f"{video_id}.*"))
            if p.suffix.lower() in VIDEO_EXTENSIONS and p.stem == video_id
        ]
        if not matches:
            known = sorted(
                p.stem for p in videos_dir.iterdir() if p.suffix.lower() in VIDEO_EXTENSIONS
            )
            hint = (
                f" (videos there: {', '.join(known[:10])}{' ...' if len(known) > 10 else ''})"
                if known
                else " (it holds no videos)"
            )
            raise InputError(
                f"unknown video id {video_id!r}: no video file named {video_id}.* in {videos_dir}{hint}"
            )
        if len(matches) > 1:
            raise InputError(
                f"video id {video_id!r} is ambiguous in {videos_dir}: {', '.join(p.name for p in matches)}"
            )
        return matches[0]

    def resolve(self, video_id: str, videos_dir: str | Path = ".", **options: Any) -> Video:
        check_video_id(video_id)
        root = Path(videos_dir)
        if not root.is_dir():
            raise InputError(f"videos directory not found: {root}")
        path = self._find(video_id, root)
        meta: dict[str, Any] = {}
        sidecar = root / f"{video_id}.json"
        if sidecar.exists():
            try:
                meta = json.loads(sidecar.read_text())
            except json.JSONDecodeError as exc:
                raise InputError(f"metadata file {sidecar} is not JSON: {exc.msg}") from None
        meta.update({k: v for k, v in options.items() if v is not None})
        kp = meta.get("knowledge_point")
        if isinstance(kp, str):
            meta["knowledge_point"] = KnowledgePoint(term=kp)
        relative = video_path_in_root(path, root)
        if meta.setdefault("video_path", relative) != relative:
            raise InputError(
                f"metadata file {sidecar}: video_path {meta['video_path']!r} is not the "
                f"file's path under {root} ({relative!r}): drop the field, vkr derives it"
            )
        try:
            return Video(video_id=video_id, path=str(path.resolve()), **meta)
        except ValidationError as exc:
            raise InputError(f"metadata for {video_id}: {describe_validation_error(exc)}") from None

    def list(self, videos_dir: str | Path = ".", **options: Any) -> list[Video]:
        root = Path(videos_dir)
        return [
            self.resolve(p.stem, root, **options)
            for p in sorted(root.iterdir())
            if p.suffix.lower() in VIDEO_EXTENSIONS
        ]


@hookimpl
def vkr_register_sources(register: Any) -> None:
    register(LocalFolderSource())
