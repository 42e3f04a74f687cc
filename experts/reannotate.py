"""Re-annotation of probe-filtered evaluation videos (issue 13, task 3).

``vkr probe`` moves questions that one random frame answers to ``filtered.jsonl``. As in the
paper, each filtered question is replaced by one new, grounded question, written by one
expert and reviewed by a second, in a loopback page (the pilot review page's conventions).
The new item is a document of ``labelling.store.DocumentHistory`` whose id is the filtered
question's: the first save writes it, its author's later saves edit it, another annotator's
revise it, a second annotator approves it; every version is kept with who and when. The
export merges the probe's ``kept.jsonl``, unchanged, with the approved new items into the
eval file shape ``vkr probe`` reads, so the merged set can be probed again.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from dataclasses import dataclass
from http import HTTPStatus
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pydantic import ValidationError

from corpus.probe import load_eval_set, video_key
from experts.reannotate_page import PAGE
from labelling.http import MAX_BODY, LoopbackHandler, LoopbackServer, check_host
from labelling.store import Document, DocumentHistory, check_annotator, is_doc_id
from plugins.exporters.evaluation import EVAL_FILE
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
MAX_TEXT = 4000
# One frame image by a hash the page was given: the URL never names a path.
_FRAME_URL = re.compile(r"^/frame/([0-9a-f]{64})\.jpg$")


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


def open_store(out_dir: str | Path) -> DocumentHistory:
    """The re-annotations of one probe output: one document per filtered question."""
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    return DocumentHistory(Path(out_dir) / DB_FILE, what="new question")


def doc_id(source_id: str) -> str:
    """The document id of a filtered question: its own id, or (an eval id with characters a
    document id does not take, e.g. a slash or a space) a digest of it."""
    if is_doc_id(source_id):
        return source_id
    return "sha256-" + hashlib.sha256(source_id.encode()).hexdigest()


def new_item_id(source_id: str) -> str:
    """The new question's id: one per filtered question, stable across revisions, reviews
    and reruns (whoever wrote it)."""
    return f"{source_id}-re"


@dataclass
class Saved:
    """What a save or an approval did: written, edited, revised, approved or unchanged."""

    change: str
    document: Document


def save_item(
    store: DocumentHistory,
    source_id: str,
    annotator: str,
    item: dict[str, Any],
    source: str = "web",
) -> Saved:
    """Save a checked item as the document of ``source_id``: its first save writes it, its
    author's later saves edit it, another annotator's revise it; the same text is no change."""
    before = store.get(doc_id(source_id))
    after = store.save(doc_id(source_id), annotator, item, source=source, create=True)
    if before is not None and len(after.history) == len(before.history):
        return Saved("unchanged", after)
    return Saved(after.history[-1].action, after)


def approve_item(
    store: DocumentHistory, source_id: str, annotator: str, source: str = "web"
) -> Saved:
    """A second annotator approves the current text of ``source_id`` as it is."""
    before = store.get(doc_id(source_id))
    if before is None:
        raise InputError(f"nothing written for {source_id} yet: there is nothing to approve")
    after = store.approve(doc_id(source_id), annotator, source=source)
    return Saved("approved" if len(after.history) > len(before.history) else "unchanged", after)


def reviewer(document: Document) -> str | None:
    """Who approved the current text (None while it waits for review)."""
    if document.status != "approved":
        return None
    return document.history[-1].annotator


def document_json(document: Document, source_id: str) -> dict[str, Any]:
    """A document as the page and the tasks show it: the item, who wrote it, its review."""
    return {
        **document.body,
        "source_id": source_id,
        "author": document.author,
        "status": document.status,
        "reviewer": reviewer(document),
        "revised": document.revised,
        "created_at": document.created_at,
        "updated_at": document.updated_at,
        "history": [
            {
                "annotator": v.annotator,
                "action": v.action,
                "at": v.created_at,
                "via": v.source,
                # What that version said, so a reviewer sees what a revision changed.
                "question": v.body.get("question"),
                "answer": v.body.get("answer"),
            }
            for v in document.history
        ],
    }


def provenance(document: Document, source_id: str) -> dict[str, Any]:
    """What a new item's provenance says: what it replaces, who wrote and reviewed it."""
    return {
        "kind": PROVENANCE_KIND,
        "replaces": source_id,
        "status": document.status,
        "author": document.author,
        "reviewer": reviewer(document),
        # The paper's count: items a second annotator changed before they were kept.
        "revised": document.revised,
        "revised_by": sorted({v.annotator for v in document.history if v.action == "revised"}),
        "written_at": document.created_at,
        "updated_at": document.updated_at,
        "versions": len(document.history),
    }


@dataclass
class Exported:
    path: Path
    kept: int
    new: int
    # Written but not approved by a second annotator: left out unless include_pending.
    pending: int
    # Questions whose video the probe could not read: in neither kept nor filtered, so not
    # in the merged set either; the user is told, they are not dropped silently.
    unprobed: int
    include_pending: bool = False


def export(
    reannotations: str | Path,
    probe_out: str | Path,
    out_dir: str | Path,
    include_pending: bool = False,
) -> Exported:
    """Write OUT/VideoKR_eval.jsonl: kept.jsonl unchanged, then the approved new items (and
    the pending ones, marked so in their provenance, with ``include_pending``). The file is
    read back with ``vkr probe``'s reader."""
    probe = Path(probe_out)
    db = Path(reannotations) / DB_FILE
    if not db.is_file():
        raise InputError(f"{reannotations} holds no re-annotations (no {DB_FILE})")
    if not (probe / "kept.jsonl").is_file():
        raise InputError(f"{probe} is not a `vkr probe` output folder (no kept.jsonl)")
    kept = [row for _, row in read_jsonl(probe / "kept.jsonl")]
    sources = {s.source_id: s for s in load_filtered(probe)}
    with open_store(reannotations) as store:
        documents = store.documents()
    known = {doc_id(sid) for sid in sources}
    for stray in documents:
        if stray.doc_id not in known:
            raise InputError(
                f"re-annotation of {stray.doc_id!r} has no filtered question in {probe}"
            )
    by_doc = {d.doc_id: d for d in documents}
    new_rows = []
    pending = 0
    # In the probe's order of the questions they replace: a rerun writes the same file.
    for source in sources.values():
        document = by_doc.get(doc_id(source.source_id))
        if document is None:
            continue
        if document.status != "approved":
            pending += 1
            if not include_pending:
                continue
        new_rows.append(
            eval_row(
                source,
                document.body,
                new_item_id(source.source_id),
                provenance(document, source.source_id),
            )
        )
    path = Path(out_dir) / EVAL_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept + new_rows))
    load_eval_set(path)  # duplicate ids or a bad line: an error now, not at the next probe
    unprobed = sum(1 for _ in read_jsonl(probe / "unprobed.jsonl", missing_ok=True))
    return Exported(path, len(kept), len(new_rows), pending, unprobed, include_pending)


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
        self.store = open_store(out_dir)
        # One save at a time, so that what a save reports (written, revised...) is its own.
        self._saving = threading.Lock()
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

    def documents(self) -> dict[str, Any]:
        """Every filtered question's document, by source id: one for all annotators."""
        by_doc = {d.doc_id: d for d in self.store.documents()}
        return {
            "items": {
                sid: document_json(by_doc[doc_id(sid)], sid)
                for sid in self.sources
                if doc_id(sid) in by_doc
            }
        }

    def save(self, body: dict[str, Any]) -> dict[str, Any]:
        """Write, edit or revise a question's new item; with ``approve``, approve it.

        ``based_on`` (the page sends it) is the ``updated_at`` of the version the annotator
        was shown ("" for none): if the question was saved since, nothing is saved, so no
        one approves or overwrites a text they have not seen."""
        source = self.sources.get(str(body.get("source_id")))
        if source is None:
            raise InputError(f"no filtered question {body.get('source_id')!r} in this probe output")
        annotator = check_annotator(str(body.get("annotator") or ""))
        with self._saving:
            if "based_on" in body:
                self._check_unchanged(source.source_id, body["based_on"])
            if body.get("approve") is True:
                done = approve_item(self.store, source.source_id, annotator)
            else:
                done = save_item(self.store, source.source_id, annotator, check_item(source, body))
        return {"change": done.change, **document_json(done.document, source.source_id)}

    def _check_unchanged(self, source_id: str, based_on: Any) -> None:
        current = self.store.get(doc_id(source_id))
        if based_on == (current.updated_at if current else ""):
            return
        if current is None:  # a stamp of a version that is not there: not from this page
            raise InputError(f"{source_id} has no version {based_on!r}: reload the page")
        last = current.history[-1]
        raise InputError(
            f"{source_id} was saved since you opened it ({last.action} by {last.annotator} at "
            f"{last.created_at[:19].replace('T', ' ')}): nothing was saved; its history shows "
            "the new version, save or approve again to go on"
        )


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
            self._json(HTTPStatus.OK, app.documents())
        elif match := _FRAME_URL.match(url.path):
            self.serve_frame(app.frames.get(match.group(1)))
        else:
            self._error(HTTPStatus.NOT_FOUND, f"no page {url.path}")

    def do_POST(self) -> None:
        if not self._host_ok():
            return
        if self.path != "/api/items":
            self._error(HTTPStatus.NOT_FOUND, "no such endpoint")
            return
        body = self.read_json(MAX_BODY, "an item")
        if body is None:
            return
        try:
            self._json(HTTPStatus.OK, self.server.app.save(body))
        except VkrError as exc:
            self._error(HTTPStatus.BAD_REQUEST, str(exc))


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], app: ReannotateApp):
        self.app = app
        self.host = address[0]
        super().__init__(address, _Handler)


class ReannotateServer(LoopbackServer):
    """``with ReannotateServer(probe_out, out_dir) as server: server.url`` serves the page."""

    thread_name = "vkr-reannotate"

    def __init__(
        self,
        probe_out: str | Path,
        out_dir: str | Path,
        host: str = "127.0.0.1",
        port: int = 0,
        annotator: str | None = None,
        frames_dir: str | Path | None = None,
    ):
        host = check_host(host, "the re-annotation page", "the questions and the new items")
        if annotator is not None:
            annotator = check_annotator(annotator)
        self.app = ReannotateApp(probe_out, out_dir, annotator, frames_dir)
        self.listen(_Server, host, port)
