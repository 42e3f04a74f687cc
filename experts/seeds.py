"""The seed page: experts write seed examples on a video's frames; a second one reviews them.

Loopback only, stdlib ``http.server``, one HTML page with plain JavaScript, as the pilot
review page (``qualification.review``). Every save is written to ``SEEDS_DIR/seeds.sqlite``
at once. A seed is never overwritten: each save (write, edit, revision, approval) is a new
version row and the one it replaces points at it (``superseded_by``), so the original of a
revised seed stays in its history. Only approved seeds are exported to the seed bank.
"""

from __future__ import annotations

import json
import re
import sqlite3
import threading
import uuid
from collections.abc import Collection
from http import HTTPStatus
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from pydantic import ValidationError

from experts.seeds_page import PAGE
from labelling.http import LoopbackHandler, LoopbackServer
from labelling.http import check_host as _loopback
from qualification.labels import check_annotator, now
from vkr_core.config import RunConfig
from vkr_core.errors import describe_validation_error
from vkr_core.files import atomic_write
from vkr_core.manifest import load_manifest
from vkr_core.plugins import VkrPluginManager
from vkr_core.schemas import Frame, FrameSampling, InputError, SeedExample, Video, VkrError
from vkr_core.video import sample_frames

MAX_BODY = 64 * 1024
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
    return f"{sampling.fps:g} fps, at most {sampling.max_frames} frames"


# A step cites the frame it rests on as mm:ss (or h:mm:ss), the clock the frames show.
_CLOCK = re.compile(r"\b\d{1,2}:\d{2}(:\d{2})?\b")
_OPTION = re.compile(r"^[A-Z]\. \S")
_SEED_ID = re.compile(r"^[0-9a-f]{32}$")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS versions (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    seed_id TEXT NOT NULL,
    annotator TEXT NOT NULL,
    action TEXT NOT NULL CHECK (action IN ('written', 'edited', 'revised', 'approved')),
    video_id TEXT NOT NULL,
    discipline TEXT NOT NULL,
    subject TEXT NOT NULL,
    skill TEXT NOT NULL,
    sampling TEXT NOT NULL,
    question TEXT NOT NULL,
    options TEXT,
    answer TEXT NOT NULL,
    reasoning TEXT NOT NULL,
    created_at TEXT NOT NULL,
    superseded_by INTEGER REFERENCES versions(id)
);
CREATE UNIQUE INDEX IF NOT EXISTS one_current_version
    ON versions (seed_id) WHERE superseded_by IS NULL;
"""
_CONTENT = (
    "video_id",
    "discipline",
    "subject",
    "skill",
    "sampling",
    "question",
    "options",
    "answer",
    "reasoning",
)


def check_host(host: str) -> str:
    """The host if it is a loopback address; else InputError in the seed page's words."""
    try:
        return _loopback(host)
    except InputError:
        raise InputError(
            f"the seed page serves on 127.0.0.1 only, not on {host!r}: seeds and frames stay "
            "on this machine (use an SSH tunnel to write seeds from elsewhere)"
        ) from None


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


class SeedStore:
    """seeds.sqlite: every version of every seed. Safe to share between threads."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA busy_timeout=5000")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        self._db.close()

    @staticmethod
    def _version(row: sqlite3.Row) -> dict[str, Any]:
        version = dict(row)
        version["options"] = json.loads(row["options"]) if row["options"] else None
        version["sampling"] = json.loads(row["sampling"])
        return version

    def history(self, seed_id: str) -> list[dict[str, Any]]:
        with self._lock:
            rows = self._db.execute(
                "SELECT * FROM versions WHERE seed_id = ? ORDER BY id", (seed_id,)
            ).fetchall()
        return [self._version(r) for r in rows]

    def seeds(self) -> list[dict[str, Any]]:
        """Every seed's current version with its author, status and history, oldest first."""
        with self._lock:
            rows = self._db.execute("SELECT * FROM versions ORDER BY id").fetchall()
        by_seed: dict[str, list[dict[str, Any]]] = {}
        for row in rows:
            by_seed.setdefault(row["seed_id"], []).append(self._version(row))
        return [_summary(versions) for versions in by_seed.values()]

    def save(
        self, seed_id: str | None, annotator: str, content: dict[str, Any], approve: bool = False
    ) -> dict[str, Any]:
        """A new version of a seed (a new seed without ``seed_id``); returns its summary."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                previous = None
                if seed_id is not None:
                    previous = self._db.execute(
                        "SELECT * FROM versions WHERE seed_id = ? AND superseded_by IS NULL",
                        (seed_id,),
                    ).fetchone()
                    if previous is None:
                        raise InputError(f"no seed {seed_id!r}")
                    author = self._db.execute(
                        "SELECT annotator FROM versions WHERE seed_id = ? ORDER BY id LIMIT 1",
                        (seed_id,),
                    ).fetchone()["annotator"]
                    if approve:
                        if annotator == author:
                            raise InputError(
                                f"{annotator} wrote this seed: a second annotator approves it"
                            )
                        content = {k: self._version(previous)[k] for k in _CONTENT}
                        action = "approved"
                    else:
                        action = "edited" if annotator == author else "revised"
                else:
                    if approve:
                        raise InputError("approve names the seed_id of a written seed")
                    seed_id = uuid.uuid4().hex
                    action = "written"
                if previous is not None:
                    self._db.execute(
                        "UPDATE versions SET superseded_by = -1 WHERE id = ?", (previous["id"],)
                    )
                cursor = self._db.execute(
                    "INSERT INTO versions (seed_id, annotator, action, video_id, discipline,"
                    " subject, skill, sampling, question, options, answer, reasoning,"
                    " created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        seed_id,
                        annotator,
                        action,
                        content["video_id"],
                        content["discipline"],
                        content["subject"],
                        content["skill"],
                        json.dumps(content["sampling"], sort_keys=True),
                        content["question"],
                        None if content["options"] is None else json.dumps(content["options"]),
                        content["answer"],
                        content["reasoning"],
                        now(),
                    ),
                )
                if previous is not None:
                    self._db.execute(
                        "UPDATE versions SET superseded_by = ? WHERE id = ?",
                        (cursor.lastrowid, previous["id"]),
                    )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return _summary(self.history(seed_id))


def _summary(versions: list[dict[str, Any]]) -> dict[str, Any]:
    current = versions[-1]
    author = versions[0]["annotator"]
    return {
        **{k: current[k] for k in ("seed_id", *_CONTENT, "created_at")},
        "author": author,
        "status": "approved" if current["action"] == "approved" else "pending",
        # The paper's count: seeds a second annotator changed before they were kept.
        "revised": any(v["action"] == "revised" for v in versions),
        "history": [
            {k: v[k] for k in ("annotator", "action", "question", "answer", "created_at")}
            for v in versions
        ],
    }


def counts(seeds: list[dict[str, Any]], target: int) -> list[dict[str, Any]]:
    """Per (discipline, skill): seeds written, approved, revised by a second annotator."""
    table: dict[tuple[str, str], dict[str, Any]] = {}
    for seed in seeds:
        key = (seed["discipline"], seed["skill"])
        row = table.setdefault(
            key,
            {"discipline": key[0], "skill": key[1], "written": 0, "approved": 0, "revised": 0},
        )
        row["written"] += 1
        row["approved"] += seed["status"] == "approved"
        row["revised"] += seed["revised"]
    return [
        {**row, "target": target, "missing": max(0, target - row["approved"])}
        for _, row in sorted(table.items())
    ]


def open_store(seeds_dir: str | Path) -> SeedStore:
    folder = Path(seeds_dir)
    folder.mkdir(parents=True, exist_ok=True)
    return SeedStore(folder / "seeds.sqlite")


def export_bank(seeds_dir: str | Path, out: str | Path) -> int:
    """Write the approved seeds as the seed-bank jsonl `vkr run --seed-bank` reads."""
    path = Path(seeds_dir) / "seeds.sqlite"
    if not path.is_file():
        raise InputError(
            f"no seeds in {seeds_dir}: {path} not found (write some with vkr seeds serve)"
        )
    store = SeedStore(path)
    try:
        approved = [s for s in store.seeds() if s["status"] == "approved"]
    finally:
        store.close()
    if not approved:
        raise InputError(f"{seeds_dir} holds no approved seed: a second annotator approves them")
    lines = [
        SeedExample(
            discipline=s["discipline"],
            subject=s["subject"],
            skill=s["skill"],
            question=s["question"],
            options=s["options"],
            answer=s["answer"],
            reasoning=s["reasoning"],
            sampling=s["sampling"],
        ).model_dump_json()
        + "\n"
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
        seeds = self.store.seeds()
        return {"seeds": seeds, "counts": counts(seeds, self.target)}

    def save(self, body: dict[str, Any]) -> dict[str, Any]:
        annotator = check_annotator(str(body.get("annotator") or ""))
        seed_id = body.get("seed_id")
        if seed_id is not None and (not isinstance(seed_id, str) or not _SEED_ID.match(seed_id)):
            raise InputError(f"no seed {seed_id!r}")
        if body.get("approve"):
            return self.store.save(seed_id, annotator, {}, approve=True)
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
        return self.store.save(seed_id, annotator, content)


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
                path = app.frame_file(match.group(1), match.group(2))
                if path is None or not path.is_file():
                    self._error(HTTPStatus.NOT_FOUND, "no such frame")
                    return
                self._send(HTTPStatus.OK, path.read_bytes(), "image/jpeg")
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
        # Only JSON: a cross-site form cannot send it.
        if self.headers.get_content_type() != "application/json":
            self._error(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, "seeds are posted as JSON")
            return
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY:
            self._error(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, "seed too large")
            return
        try:
            body = json.loads(self.rfile.read(length) or b"{}")
            if not isinstance(body, dict):
                raise InputError("a seed is a JSON object")
            self._json(HTTPStatus.OK, self.server.app.save(body))
        except json.JSONDecodeError as exc:
            self._error(HTTPStatus.BAD_REQUEST, f"not JSON: {exc}")
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
        host = check_host(host)
        if annotator is not None:
            annotator = check_annotator(annotator)
        self.app = SeedsApp(manifest, seeds_dir, pm, target, annotator, fps, max_frames)
        self.listen(_SeedsHTTPServer, host, port)
