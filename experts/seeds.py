"""The seed page: experts write seed examples on a video's frames; a second one reviews them.

Loopback only, stdlib ``http.server``, one HTML page with plain JavaScript, as the pilot
review page (``qualification.review``), on the labelling pages' shared core (``labelling``).
Every save is written to ``SEEDS_DIR/seeds.sqlite`` at once, a ``labelling.store.
DocumentHistory`` whose documents are seeds: a seed is never overwritten, each write, edit,
revision and approval is a new version, so the original of a revised seed stays in its
history. Only approved seeds are exported to the seed bank.
"""

from __future__ import annotations

import json
import re
import sqlite3
import threading
from collections.abc import Collection
from http import HTTPStatus
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from pydantic import ValidationError

from experts.seeds_page import PAGE
from labelling.http import MAX_BODY, LoopbackHandler, LoopbackServer, check_host
from labelling.store import Document, DocumentHistory, check_annotator
from vkr_core.config import RunConfig
from vkr_core.errors import describe_validation_error
from vkr_core.files import atomic_write
from vkr_core.manifest import load_manifest
from vkr_core.plugins import VkrPluginManager
from vkr_core.schemas import Frame, FrameSampling, InputError, SeedExample, Video, VkrError
from vkr_core.video import sample_frames

MAX_FIELD = 8000
DEFAULT_TARGET = 150
_FRAME = re.compile(r"^/frames/([A-Za-z0-9._-]+)/([0-9a-f]{64})\.jpg$")


def seed_frames_dir(seeds_dir: Path, video_id: str, sampling: FrameSampling) -> Path:
    """Where the seeds folder keeps a video's frames sampled so (its own layout, not a run's).

    Each sampling has its own folder: a seed's timestamps stay tied to the frames its author
    saw when the page is later served with other settings.
    """
    return seeds_dir / "frames" / f"fps{sampling.fps!r}_max{sampling.max_frames}" / video_id


def sampling_text(sampling: FrameSampling) -> str:
    """The sampling as the page and the review tools show it."""
    return f"{sampling.fps:g} fps, at most {sampling.max_frames} frames"


# A step cites the frame it rests on as mm:ss (or h:mm:ss), the clock the frames show.
_CLOCK = re.compile(r"\b\d{1,2}:\d{2}(:\d{2})?\b")
_OPTION = re.compile(r"^[A-Z]\. \S")


def _text(body: dict[str, Any], field: str, what: str) -> str:
    value = body.get(field)
    if value is None:
        value = ""
    if not isinstance(value, str):
        raise InputError(f"{what} must be text")
    value = value.strip()
    if not value:
        raise InputError(f"the {what} is empty: write one")
    if len(value) > MAX_FIELD:
        raise InputError(f"the {what} is longer than {MAX_FIELD} characters")
    return value


def check_seed(body: dict[str, Any], skills: Collection[str]) -> dict[str, Any]:
    """The content of a seed as posted, checked; else InputError saying what to fix."""
    skill = body.get("skill")
    if not isinstance(skill, str) or skill not in skills:
        raise InputError(
            f"skill {skill!r} is not a registered skill (registered: {', '.join(sorted(skills))})"
        )
    question = _text(body, "question", "question")
    options = body.get("options")
    if options is not None:
        if not isinstance(options, list) or not all(isinstance(o, str) for o in options):
            raise InputError("options must be a list of texts, or null for an open question")
        options = [o.strip() for o in options if o.strip()]
        if len(options) < 2:
            raise InputError("a multiple-choice question needs at least 2 options")
        letters = [chr(ord("A") + i) for i in range(len(options))]
        for letter, option in zip(letters, options, strict=True):
            if not _OPTION.match(option) or option[0] != letter:
                raise InputError(f"option {option[:40]!r} must start with {letter + '. '!r}")
    answer = _text(body, "answer", "answer")
    if options is not None and answer not in [o[0] for o in options]:
        raise InputError(
            f"the answer of a multiple-choice question is an option's letter, not {answer[:40]!r}"
        )
    reasoning = _text(body, "reasoning", "reasoning")
    if not _CLOCK.search(reasoning):
        raise InputError(
            "the reasoning cites no timestamp: name the frames its steps rest on (e.g. 00:05)"
        )
    subject = body.get("subject") or ""
    if not isinstance(subject, str):
        raise InputError("subject must be text")
    return {
        "skill": skill,
        "question": question,
        "options": options,
        "answer": answer,
        "reasoning": reasoning,
        "subject": subject.strip(),
    }


def counts(seeds: list[Document], target: int) -> list[dict[str, Any]]:
    """Per (discipline, skill): seeds written, approved, revised by a second annotator."""
    table: dict[tuple[str, str], dict[str, Any]] = {}
    for seed in seeds:
        key = (seed.body["discipline"], seed.body["skill"])
        row = table.setdefault(
            key,
            {"discipline": key[0], "skill": key[1], "written": 0, "approved": 0, "revised": 0},
        )
        row["written"] += 1
        row["approved"] += seed.status == "approved"
        row["revised"] += seed.revised
    return [
        {**row, "target": target, "missing": max(0, target - row["approved"])}
        for _, row in sorted(table.items())
    ]


def open_store(seeds_dir: str | Path, create: bool = True) -> DocumentHistory:
    """SEEDS_DIR/seeds.sqlite; without ``create`` a missing one is an InputError."""
    path = Path(seeds_dir) / "seeds.sqlite"
    if not create and not path.is_file():
        raise InputError(
            f"no seeds in {seeds_dir}: {path} not found (write some with vkr seeds serve)"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        return DocumentHistory(path, what="seed")
    except sqlite3.Error as exc:
        # E.g. a seeds.sqlite of the page before the shared store (unreleased, not migrated).
        raise InputError(
            f"{path} is not a seed store this vkr reads ({exc}): move it aside and start anew"
        ) from None


def export_bank(seeds_dir: str | Path, out: str | Path) -> int:
    """Write the approved seeds as the seed-bank jsonl `vkr run --seed-bank` reads."""
    with open_store(seeds_dir, create=False) as store:
        approved = [s for s in store.documents() if s.status == "approved"]
    if not approved:
        raise InputError(f"{seeds_dir} holds no approved seed: a second annotator approves them")
    fields = set(SeedExample.model_fields)
    lines = [
        SeedExample(**{k: v for k, v in s.body.items() if k in fields}).model_dump_json() + "\n"
        for s in approved
    ]
    atomic_write(out, "".join(lines))
    return len(lines)


class SeedsApp:
    """The manifest's videos, their frames, the seed store and the page."""

    def __init__(
        self,
        manifest: str | Path,
        seeds_dir: str | Path,
        pm: VkrPluginManager,
        target: int = DEFAULT_TARGET,
        default_annotator: str | None = None,
        fps: float = 0.2,
        max_frames: int = 64,
    ):
        try:
            # A run's sampling, validated as a run's: the clocks a seed cites are those the
            # generator sees when the run samples the same way.
            self.config = RunConfig(fps=fps, max_frames=max_frames)
        except ValidationError as exc:
            raise InputError(f"frame sampling: {describe_validation_error(exc)}") from None
        self.sampling = FrameSampling(fps=self.config.fps, max_frames=self.config.max_frames)
        loaded = load_manifest(manifest)
        if not loaded.videos:
            reasons = "; ".join(p.reason for p in loaded.problems[:3])
            raise InputError(
                f"manifest {manifest} has no usable video" + (f": {reasons}" if reasons else "")
            )
        if target < 1:
            raise InputError(f"--target must be at least 1, got {target}")
        self.videos: dict[str, Video] = {v.video_id: v for v in loaded.videos}
        # Lines left out (no file, bad id, ...): the page names them, so none vanishes unseen.
        self.problems = [p.reason for p in loaded.problems]
        self.skills = sorted(pm.registry.skills)
        self.pm = pm
        self.target = target
        self.seeds_dir = Path(seeds_dir)
        self.store = open_store(seeds_dir)
        self._frames: dict[str, dict[str, Frame]] = {}
        # A video that cannot be decoded is refused from then on, not decoded again per click.
        self._unreadable: dict[str, str] = {}
        # One lock per video: a slow or hanging decode holds up that video only.
        self._frame_locks = {video_id: threading.Lock() for video_id in self.videos}
        self.state_json = json.dumps(
            {
                "skills": self.skills,
                "target": target,
                "sampling": {**self.sampling.model_dump(), "text": sampling_text(self.sampling)},
                "problems": self.problems,
                "default_annotator": default_annotator,
                "videos": [
                    {
                        "video_id": v.video_id,
                        "title": v.title,
                        "discipline": v.discipline,
                        "subject": v.subject,
                    }
                    for v in loaded.videos
                ],
            }
        ).encode()

    def close(self) -> None:
        self.store.close()

    def _video(self, video_id: Any) -> Video:
        if not isinstance(video_id, str) or video_id not in self.videos:
            raise InputError(f"the manifest has no video {video_id!r}")
        return self.videos[video_id]

    def frames(self, video_id: str) -> list[dict[str, Any]]:
        """The video's frames as a run samples them (sampled once, then read from disk);
        InputError saying why for a video that cannot be decoded."""
        video = self._video(video_id)
        with self._frame_locks[video_id]:
            if video_id in self._unreadable:
                raise InputError(self._unreadable[video_id])
            if video_id not in self._frames:
                config = self.config
                try:
                    frames = sample_frames(
                        video.path,
                        seed_frames_dir(self.seeds_dir, video_id, self.sampling),
                        fps=config.fps,
                        max_frames=config.max_frames,
                        max_side=config.max_side,
                        jpeg_quality=config.jpeg_quality,
                        timeout=config.decode_timeout,
                        pm=self.pm,
                    )
                except (VkrError, OSError) as exc:
                    self._unreadable[video_id] = (
                        f"video {video_id} has no frames to write a seed on: {exc}"
                    )
                    raise InputError(self._unreadable[video_id]) from None
                self._frames[video_id] = {f.sha256: f for f in frames}
        return [
            {"url": f"/frames/{video_id}/{f.sha256}.jpg", "clock": f.clock, "time": f.timestamp}
            for f in self._frames[video_id].values()
        ]

    def frame_file(self, video_id: str, sha256: str) -> Path | None:
        frame = self._frames.get(video_id, {}).get(sha256)
        return Path(frame.path) if frame is not None else None

    def state(self) -> dict[str, Any]:
        seeds = self.store.documents()
        return {"seeds": [s.to_json() for s in seeds], "counts": counts(seeds, self.target)}

    def save(self, body: dict[str, Any]) -> dict[str, Any]:
        """A seed as posted (new, edited, revised, or ``approve``d); the seed as stored."""
        annotator = check_annotator(str(body.get("annotator") or ""))
        seed_id = body.get("seed_id")
        if seed_id is not None and not isinstance(seed_id, str):
            raise InputError(f"no seed {seed_id!r}")
        if body.get("approve"):
            if seed_id is None:
                raise InputError("approve names the seed_id of a written seed")
            return self.store.approve(seed_id, annotator).to_json()
        video = self._video(body.get("video_id"))
        content = check_seed(body, self.skills)
        # The seed cites these frames' clocks: they must exist (an undecodable video refuses).
        self.frames(video.video_id)
        content["subject"] = content["subject"] or video.subject
        content.update(
            video_id=video.video_id,
            discipline=video.discipline,
            sampling=self.sampling.model_dump(),
        )
        return self.store.save(seed_id, annotator, content).to_json()


class _Handler(LoopbackHandler):
    server: _SeedsHTTPServer

    def do_GET(self) -> None:
        if not self._host_ok():
            return
        app = self.server.app
        url = urlsplit(self.path)
        try:
            if url.path in ("/", "/index.html"):
                self._send(HTTPStatus.OK, PAGE.encode(), "text/html; charset=utf-8")
            elif url.path == "/favicon.ico":
                self._send(HTTPStatus.NO_CONTENT, b"", "image/x-icon")
            elif url.path == "/api/config":
                self._send(HTTPStatus.OK, app.state_json, "application/json")
            elif url.path == "/api/seeds":
                self._json(HTTPStatus.OK, app.state())
            elif url.path == "/api/frames":
                video_id = parse_qs(url.query).get("video", [""])[0]
                self._json(HTTPStatus.OK, {"frames": app.frames(video_id)})
            elif match := _FRAME.match(url.path):
                # Only frames sampled here: the URL names a hash, never a path.
                self.serve_frame(app.frame_file(match.group(1), match.group(2)))
            else:
                self._error(HTTPStatus.NOT_FOUND, f"no page {url.path}")
        except VkrError as exc:
            self._error(HTTPStatus.BAD_REQUEST, str(exc))

    def do_POST(self) -> None:
        if not self._host_ok():
            return
        if urlsplit(self.path).path != "/api/seeds":
            self._error(HTTPStatus.NOT_FOUND, "no such endpoint")
            return
        body = self.read_json(MAX_BODY, "a seed")
        if body is None:
            return
        try:
            self._json(HTTPStatus.OK, self.server.app.save(body))
        except VkrError as exc:
            self._error(HTTPStatus.BAD_REQUEST, str(exc))


class _SeedsHTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], app: SeedsApp):
        self.app = app
        self.host = address[0]
        super().__init__(address, _Handler)


class SeedsServer(LoopbackServer):
    thread_name = "vkr-seeds"

    """``with SeedsServer(manifest, seeds_dir, pm) as server: server.url`` serves the page."""

    def __init__(
        self,
        manifest: str | Path,
        seeds_dir: str | Path,
        pm: VkrPluginManager,
        host: str = "127.0.0.1",
        port: int = 0,
        target: int = DEFAULT_TARGET,
        annotator: str | None = None,
        fps: float = 0.2,
        max_frames: int = 64,
    ):
        host = check_host(host, "the seed page", "seeds and frames")
        if annotator is not None:
            annotator = check_annotator(annotator)
        self.app = SeedsApp(manifest, seeds_dir, pm, target, annotator, fps, max_frames)
        self.listen(_SeedsHTTPServer, host, port)
