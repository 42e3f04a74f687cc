"""Re-annotation of probe-filtered evaluation videos (issue 13, task 3).

``vkr probe`` moves questions that one random frame answers to ``filtered.jsonl``. Experts
write new, grounded questions on those videos in a loopback page (the pilot review page's
conventions: ``qualification/review.py``); every save lands in ``reannotations.sqlite`` at
once, a revision never overwrites the row it replaces (history per annotator). The export
merges the probe's ``kept.jsonl``, unchanged, with the new items into the eval file shape
``vkr probe`` reads, so the merged set can be probed again.
"""

from __future__ import annotations

import hashlib
import json
import re
import sqlite3
import threading
from dataclasses import dataclass
from datetime import UTC, datetime
from http import HTTPStatus
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from pydantic import ValidationError

from corpus.probe import load_eval_set, video_key
from experts.reannotate_page import PAGE
from labelling.http import LoopbackHandler, LoopbackServer, check_host
from plugins.exporters.evaluation import EVAL_FILE
from qualification.labels import check_annotator
from vkr_core.errors import describe_validation_error
from vkr_core.files import atomic_write, read_jsonl
from vkr_core.schemas import OPTION_LETTERS, EvalQuestion, InputError, VkrError
from vkr_core.store import RunLayout

DB_FILE = "reannotations.sqlite"
# What a new item's provenance says it is; the export's readers can select on it.
PROVENANCE_KIND = "expert re-annotation"
# Probe bookkeeping on filtered.jsonl rows; a new item is a question, not a probe result.
_PROBE_FIELDS = {"solved_by", "solving_frames", "unprobed_reason"}
# Fields the expert writes; everything else of the filtered row (dataset, subject, skill...)
# carries over to the new item.
_QUESTION_FIELDS = {"id", "question", "options", "problem_type", "solution"}
MAX_BODY = 64 * 1024
MAX_TEXT = 4000
# One frame image by a hash the page was given: the URL never names a path.
_FRAME_URL = re.compile(r"^/frame/([0-9a-f]{64})\.jpg$")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS items (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    source_id TEXT NOT NULL,
    annotator TEXT NOT NULL,
    payload TEXT NOT NULL,
    created_at TEXT NOT NULL,
    superseded_by INTEGER REFERENCES items(id)
);
CREATE UNIQUE INDEX IF NOT EXISTS one_current_item
    ON items (source_id, annotator) WHERE superseded_by IS NULL;
"""


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


@dataclass
class FilteredVideo:
    """A filtered question of the probe, with its video's frames (timestamp, path)."""

    row: dict[str, Any]
    frames: list[tuple[float, Path]]

    @property
    def source_id(self) -> str:
        return str(self.row["id"])


def load_filtered(
    probe_out: str | Path, frames_dir: str | Path | None = None
) -> list[FilteredVideo]:
    """The probe's filtered questions, each with the frames the probe sampled of its video."""
    out = Path(probe_out)
    if not (out / "filtered.jsonl").is_file():
        raise InputError(f"{out} is not a `vkr probe` output folder (no filtered.jsonl)")
    root = Path(frames_dir) if frames_dir else _probe_frames(out)
    items = []
    for _, row in read_jsonl(out / "filtered.jsonl"):
        if "id" not in row or "video_path" not in row:
            raise InputError(f"{out / 'filtered.jsonl'}: a row without id or video_path")
        folder = root / video_key(str(row["video_path"]))
        items.append(FilteredVideo(row, _frames(folder)))
    return items


def _probe_frames(out: Path) -> Path:
    """Where the probe put its frames: its --frames-dir as its config recorded it, else the
    run directory's own frames folder."""
    layout = RunLayout(out)
    config = (layout.read_config() or {}).get("config")
    recorded = config.get("frames_dir") if isinstance(config, dict) else None
    return Path(recorded) if isinstance(recorded, str) and recorded else layout.frames_root


def _frames(folder: Path) -> list[tuple[float, Path]]:
    # The manifest vkr_core.video writes beside the JPEGs; a video whose frames are gone
    # is still listed (the expert may watch it elsewhere), only without thumbnails.
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
        return [(float(f["timestamp"]), folder / f["path"]) for f in manifest["frames"]]
    except (OSError, ValueError, KeyError, TypeError):
        return []


def check_item(source: FilteredVideo, body: dict[str, Any]) -> dict[str, Any]:
    """A new item as the page sends it, checked; InputError (one line) says what is wrong."""
    sid = source.source_id
    question = body.get("question")
    if not isinstance(question, str) or not question.strip():
        raise InputError(f"new item for {sid}: the question is empty")
    if len(question) > MAX_TEXT:
        raise InputError(f"new item for {sid}: the question is longer than {MAX_TEXT} characters")
    problem_type = body.get("problem_type")
    if problem_type not in ("multiple-choice", "open-ended"):
        raise InputError(
            f"new item for {sid}: problem_type {problem_type!r} is not multiple-choice or open-ended"
        )
    raw_options = body.get("options") or []
    if not isinstance(raw_options, list) or not all(isinstance(o, str) for o in raw_options):
        raise InputError(f"new item for {sid}: options must be a list of texts")
    options = [o.strip() for o in raw_options if o.strip()]
    answer = body.get("answer")
    if not isinstance(answer, str) or not answer.strip():
        raise InputError(f"new item for {sid}: the answer is empty")
    answer = answer.strip()
    if problem_type == "multiple-choice":
        if len(options) < 2:
            raise InputError(f"new item for {sid}: a multiple-choice question needs two options")
        letters = OPTION_LETTERS[: len(options)]
        if answer.upper() in letters:
            answer = answer.upper()
        elif answer in options:  # the option's text: store its letter, as eval files do
            answer = letters[options.index(answer)]
        else:
            raise InputError(
                f"new item for {sid}: answer {answer!r} is not among its options "
                f"({', '.join(letters)})"
            )
    elif options:
        raise InputError(f"new item for {sid}: an open-ended question has no options")
    grounding = body.get("grounding")
    if not isinstance(grounding, list) or not grounding:
        raise InputError(
            f"new item for {sid}: no grounding timestamps (pick the frames that show the answer)"
        )
    last = max((t for t, _ in source.frames), default=None)
    stamps: list[float] = []
    for value in grounding:
        if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
            raise InputError(f"new item for {sid}: grounding timestamp {value!r} is not seconds")
        if last is not None and value > last + 1:
            raise InputError(
                f"new item for {sid}: grounding timestamp {value}s is past the video's last "
                f"frame ({last}s)"
            )
        stamps.append(float(value))
    item = {
        "question": question.strip(),
        "problem_type": problem_type,
        "options": options or None,
        "answer": answer,
        "grounding": sorted(set(stamps)),
    }
    try:  # the reader `vkr probe` uses must take it as it will be exported
        EvalQuestion.model_validate(eval_row(source, item, "check"))
    except ValidationError as exc:
        raise InputError(f"new item for {sid}: {describe_validation_error(exc)}") from None
    return item


def eval_row(
    source: FilteredVideo,
    item: dict[str, Any],
    new_id: str,
    provenance: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The eval-file line of a new item: the filtered row's context, the expert's question."""
    carried = {
        k: v
        for k, v in source.row.items()
        if k not in _PROBE_FIELDS and k not in _QUESTION_FIELDS and k != "video_path"
    }
    row: dict[str, Any] = {
        "id": new_id,
        "video_path": source.row["video_path"],
        "question": item["question"],
    }
    if item["options"]:
        row["options"] = item["options"]
    row.update(
        problem_type=item["problem_type"],
        solution=f"<answer>{item['answer']}</answer>",
        **carried,
    )
    row["dataset"] = source.row.get("dataset") or "videokr"
    row["grounding_timestamps"] = item["grounding"]
    if provenance is not None:
        row["provenance"] = provenance
    return row


class ReannotationStore:
    """reannotations.sqlite: every version of every new item; one current per (source,
    annotator). Safe to share between the threads of one process."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA busy_timeout=5000")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        self._db.close()

    def save(self, source_id: str, annotator: str, item: dict[str, Any]) -> dict[str, Any]:
        payload = json.dumps(item, sort_keys=True)
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                old = self._db.execute(
                    "SELECT id, payload FROM items WHERE source_id = ? AND annotator = ? "
                    "AND superseded_by IS NULL",
                    (source_id, annotator),
                ).fetchone()
                if old is None or old["payload"] != payload:
                    # Retire the old row first: the unique index allows one current row.
                    if old is not None:
                        self._db.execute(
                            "UPDATE items SET superseded_by = -1 WHERE id = ?", (old["id"],)
                        )
                    new_id = self._db.execute(
                        "INSERT INTO items (source_id, annotator, payload, created_at) "
                        "VALUES (?, ?, ?, ?)",
                        (source_id, annotator, payload, _now()),
                    ).lastrowid
                    if old is not None:
                        self._db.execute(
                            "UPDATE items SET superseded_by = ? WHERE id = ?", (new_id, old["id"])
                        )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return self.mine(annotator)[source_id]

    def _rows(self, where: str, args: tuple[Any, ...]) -> list[sqlite3.Row]:
        with self._lock:
            return self._db.execute(
                f"SELECT * FROM items WHERE {where} ORDER BY id", args
            ).fetchall()

    def history(self, source_id: str, annotator: str) -> list[dict[str, Any]]:
        rows = self._rows("source_id = ? AND annotator = ?", (source_id, annotator))
        return [{**json.loads(r["payload"]), "created_at": r["created_at"]} for r in rows]

    def current(self, annotator: str | None = None) -> list[dict[str, Any]]:
        """Current items (of one annotator), in source then annotator order, with when each
        was first written and how often it was revised."""
        where = "superseded_by IS NULL"
        args: tuple[str, ...] = ()
        if annotator is not None:
            where, args = where + " AND annotator = ?", (annotator,)
        out = []
        for row in self._rows(where, args):
            versions = self._rows(
                "source_id = ? AND annotator = ?", (row["source_id"], row["annotator"])
            )
            out.append(
                {
                    **json.loads(row["payload"]),
                    "source_id": row["source_id"],
                    "annotator": row["annotator"],
                    "created_at": row["created_at"],
                    "first_created_at": versions[0]["created_at"],
                    "changes": len(versions) - 1,
                }
            )
        return sorted(out, key=lambda e: (e["source_id"], e["annotator"]))

    def mine(self, annotator: str) -> dict[str, dict[str, Any]]:
        """An annotator's current items by source id."""
        return {e["source_id"]: e for e in self.current(annotator)}


def new_item_id(source_id: str, annotator: str) -> str:
    """Stable across revisions and reruns: the source question and who wrote the new one."""
    digest = hashlib.sha256(f"{source_id}\0{annotator}".encode()).hexdigest()[:8]
    return f"{source_id}-re-{digest}"


@dataclass
class Exported:
    path: Path
    kept: int
    new: int
    # Questions whose video the probe could not read: in neither kept nor filtered, so not
    # in the merged set either; the user is told, they are not dropped silently.
    unprobed: int


def export(reannotations: str | Path, probe_out: str | Path, out_dir: str | Path) -> Exported:
    """Write OUT/VideoKR_eval.jsonl: kept.jsonl unchanged, then the new items. The file is
    read back with ``vkr probe``'s reader."""
    probe = Path(probe_out)
    db = Path(reannotations) / DB_FILE
    if not db.is_file():
        raise InputError(f"{reannotations} holds no re-annotations (no {DB_FILE})")
    if not (probe / "kept.jsonl").is_file():
        raise InputError(f"{probe} is not a `vkr probe` output folder (no kept.jsonl)")
    kept = [row for _, row in read_jsonl(probe / "kept.jsonl")]
    sources = {s.source_id: s for s in load_filtered(probe)}
    store = ReannotationStore(db)
    try:
        current = store.current()
    finally:
        store.close()
    new_rows = []
    for entry in current:
        source = sources.get(entry["source_id"])
        if source is None:
            raise InputError(
                f"re-annotation of {entry['source_id']!r} has no filtered question in {probe}"
            )
        provenance = {
            "kind": PROVENANCE_KIND,
            "replaces": entry["source_id"],
            "annotator": entry["annotator"],
            "created_at": entry["first_created_at"],
            "revised_at": entry["created_at"],
            "revisions": entry["changes"],
        }
        item = {k: entry[k] for k in ("question", "problem_type", "options", "answer", "grounding")}
        new_rows.append(
            eval_row(source, item, new_item_id(entry["source_id"], entry["annotator"]), provenance)
        )
    path = Path(out_dir) / EVAL_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept + new_rows))
    load_eval_set(path)  # duplicate ids or a bad line: an error now, not at the next probe
    unprobed = sum(1 for _ in read_jsonl(probe / "unprobed.jsonl", missing_ok=True))
    return Exported(path, len(kept), len(new_rows), unprobed)


# ---------------------------------------------------------------- the page's server


class ReannotateApp:
    def __init__(
        self,
        probe_out: str | Path,
        out_dir: str | Path,
        default_annotator: str | None = None,
        frames_dir: str | Path | None = None,
    ):
        self.sources = {s.source_id: s for s in load_filtered(probe_out, frames_dir)}
        self.store = ReannotationStore(Path(out_dir) / DB_FILE)
        self.frames: dict[str, Path] = {}
        items = []
        for s in self.sources.values():
            views = []
            for timestamp, path in s.frames:
                sha = hashlib.sha256(str(path.resolve()).encode()).hexdigest()
                self.frames[sha] = path
                views.append({"url": f"/frame/{sha}.jpg", "t": timestamp})
            items.append({"source": {k: v for k, v in s.row.items()}, "frames": views})
        self.items_json = json.dumps(
            {"default_annotator": default_annotator, "items": items}
        ).encode()

    def close(self) -> None:
        self.store.close()

    def items_of(self, annotator: str) -> dict[str, Any]:
        annotator = check_annotator(annotator)
        others: dict[str, list[str]] = {}
        for entry in self.store.current():
            if entry["annotator"] != annotator:
                others.setdefault(entry["source_id"], []).append(entry["annotator"])
        return {"annotator": annotator, "items": self.store.mine(annotator), "others": others}

    def save(self, body: dict[str, Any]) -> dict[str, Any]:
        source = self.sources.get(str(body.get("source_id")))
        if source is None:
            raise InputError(f"no filtered question {body.get('source_id')!r} in this probe output")
        annotator = check_annotator(str(body.get("annotator") or ""))
        return self.store.save(source.source_id, annotator, check_item(source, body))


class _Handler(LoopbackHandler):
    server: _Server

    def do_GET(self) -> None:
        if not self._host_ok():
            return
        app = self.server.app
        url = urlsplit(self.path)
        if url.path in ("/", "/index.html"):
            self._send(HTTPStatus.OK, PAGE.encode(), "text/html; charset=utf-8")
        elif url.path == "/api/filtered":
            self._send(HTTPStatus.OK, app.items_json, "application/json")
        elif url.path == "/api/items":
            try:
                annotator = parse_qs(url.query).get("annotator", [""])[0]
                self._json(HTTPStatus.OK, app.items_of(annotator))
            except InputError as exc:
                self._json(HTTPStatus.BAD_REQUEST, {"error": str(exc)})
        elif match := _FRAME_URL.match(url.path):
            path = app.frames.get(match.group(1))
            if path is None or not path.is_file():
                self._json(HTTPStatus.NOT_FOUND, {"error": "no such frame"})
                return
            self._send(HTTPStatus.OK, path.read_bytes(), "image/jpeg")
        else:
            self._json(HTTPStatus.NOT_FOUND, {"error": f"no page {url.path}"})

    def do_POST(self) -> None:
        if not self._host_ok():
            return
        if self.path != "/api/items":
            self._json(HTTPStatus.NOT_FOUND, {"error": "no such endpoint"})
            return
        # JSON only: a cross-site form cannot post it.
        if self.headers.get_content_type() != "application/json":
            self._json(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, {"error": "items are posted as JSON"})
            return
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY:
            self._json(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, {"error": "item too large"})
            return
        try:
            body = json.loads(self.rfile.read(length) or b"{}")
            if not isinstance(body, dict):
                raise InputError("an item is a JSON object")
            self._json(HTTPStatus.OK, self.server.app.save(body))
        except json.JSONDecodeError as exc:
            self._json(HTTPStatus.BAD_REQUEST, {"error": f"not JSON: {exc}"})
        except VkrError as exc:
            self._json(HTTPStatus.BAD_REQUEST, {"error": str(exc)})


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], app: ReannotateApp):
        self.app = app
        self.host = address[0]
        super().__init__(address, _Handler)


class ReannotateServer(LoopbackServer):
    thread_name = "vkr-reannotate"

    """``with ReannotateServer(probe_out, out_dir) as server: server.url`` serves the page."""

    def __init__(
        self,
        probe_out: str | Path,
        out_dir: str | Path,
        host: str = "127.0.0.1",
        port: int = 0,
        annotator: str | None = None,
        frames_dir: str | Path | None = None,
    ):
        host = check_host(host)
        if annotator is not None:
            annotator = check_annotator(annotator)
        self.app = ReannotateApp(probe_out, out_dir, annotator, frames_dir)
        self.listen(_Server, host, port)
