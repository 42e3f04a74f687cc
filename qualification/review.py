"""The review page: a local web server where experts label a pilot's items.

Loopback only, stdlib ``http.server``, one HTML page with plain JavaScript. Every label is
written to the pilot's labels.sqlite the moment it is given. The server answers only
requests addressed to its own loopback host (a DNS-rebinding page cannot reach it) and
takes labels only as JSON posts (a cross-site form cannot send them).
"""

from __future__ import annotations

import html
import json
import re
from http import HTTPStatus
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from labelling.http import MAX_BODY, LoopbackHandler, LoopbackServer
from labelling.http import check_host as check_any_host
from labelling.store import Label
from qualification.labels import LabelStore, check_annotator
from qualification.models import AUTO_ANNOTATOR, CATEGORIES, PilotItem
from qualification.pilot import Pilot, open_pilot
from qualification.review_page import PAGE
from vkr_core.context import FENCE_TAG
from vkr_core.schemas import InputError, VkrError

_SHA256 = re.compile(r"^/frames/([0-9a-f]{64})\.jpg$")
_CONTEXT_LINE = re.compile(r"^(Skill|Subject|Knowledge point): .+$", re.MULTILINE)
# Current prompts carry the video's metadata in fences; these are the ones worth a glance.
_CONTEXT_FENCE = re.compile(
    rf'^<{FENCE_TAG} name="(discipline|subject|knowledge point|knowledge point definition)"'
    rf'( truncated="[^"]*")?>\n(.*?)\n</{FENCE_TAG}>$',
    re.MULTILINE | re.DOTALL,
)
_SEED = re.compile(r"^Example \d+ \(.*?\):\n(?:.+\n?)+", re.MULTILINE)


def check_host(host: str) -> str:
    """The host if it is a loopback address; else InputError in the review page's words."""
    return check_any_host(host, "the review page", keeps="pilot inputs and labels")


def _texts(item: PilotItem, role: str | None = None) -> list[str]:
    out = []
    for message in item.messages:
        if role and message["role"] != role:
            continue
        content = message["content"]
        if isinstance(content, str):
            out.append(content)
        else:
            out += [str(p.get("text", "")) for p in content if p.get("type") == "text"]
    return out


def item_view(item: PilotItem) -> dict[str, Any]:
    """What the page shows of an item: messages with frame URLs, and the key context."""
    clocks = {f.sha256: f.clock for f in item.frames}
    messages = []
    for message in item.messages:
        content = message["content"]
        parts: list[dict[str, Any]] = []
        if isinstance(content, str):
            parts.append({"text": content})
        else:
            for part in content:
                if part.get("type") == "image":
                    sha = part["sha256"]
                    parts.append({"frame": f"/frames/{sha}.jpg", "clock": clocks.get(sha)})
                else:
                    parts.append({"text": str(part.get("text", ""))})
        messages.append({"role": message["role"], "parts": parts})
    all_text = "\n".join(_texts(item))
    user_texts = _texts(item, "user")
    question = next(
        (t for t in user_texts if t.startswith("Question")),
        None,
    )
    return {
        **item.model_dump(mode="json", exclude={"messages"}),
        "frames": [
            {"url": f"/frames/{f.sha256}.jpg", "clock": f.clock, "sha256": f.sha256}
            for f in item.frames
        ],
        "messages": messages,
        "context": [m.group(0) for m in _CONTEXT_LINE.finditer(all_text)]
        + [
            f"{m.group(1).capitalize()}: {html.unescape(m.group(3))}"
            + (" [truncated]" if m.group(2) else "")
            for m in _CONTEXT_FENCE.finditer(all_text)
        ],
        "question": question,
        "seeds": [m.group(0).strip() for m in _SEED.finditer(all_text)],
    }


def _label_json(label: Label, history: int) -> dict[str, Any]:
    return {
        "label": label.label,
        "category": label.category,
        "note": label.note,
        "created_at": label.created_at,
        "changes": history - 1,
    }


class ReviewApp:
    """The pilot, its labels and the page; the HTTP handler only routes to it."""

    def __init__(self, pilot: Pilot, default_annotator: str | None = None):
        self.pilot = pilot
        self.store = LabelStore(pilot.labels_path, pilot.manifest.pilot_id)
        self.frames = pilot.frame_files()
        self.known = {item.item_id for item in pilot.items}
        self.default_annotator = default_annotator
        manifest = pilot.manifest
        self.pilot_json = json.dumps(
            {
                "pilot": {
                    "pilot_id": manifest.pilot_id,
                    "step": manifest.step,
                    "model": manifest.model,
                    "prompt_version": manifest.prompt_version,
                    "n": manifest.n,
                },
                "categories": list(CATEGORIES),
                "default_annotator": default_annotator,
                "items": [item_view(item) for item in pilot.items],
            }
        ).encode()

    def close(self) -> None:
        self.store.close()

    def labels_of(self, annotator: str) -> dict[str, Any]:
        annotator = check_annotator(annotator)
        mine = {}
        for label in self.store.current(annotator):
            history = len(self.store.history(label.item_id, annotator))
            mine[label.item_id] = _label_json(label, history)
        others: dict[str, int] = {}
        for label in self.store.current():
            if label.annotator not in (annotator, AUTO_ANNOTATOR):
                others[label.item_id] = others.get(label.item_id, 0) + 1
        return {"annotator": annotator, "labels": mine, "others": others}

    def save(self, body: dict[str, Any]) -> dict[str, Any]:
        item_id = body.get("item_id")
        if item_id not in self.known:
            raise InputError(f"pilot {self.pilot.manifest.pilot_id} has no item {item_id!r}")
        annotator = check_annotator(str(body.get("annotator") or ""))
        note = body.get("note") or ""
        if not isinstance(note, str):
            raise InputError("note must be text")
        change = self.store.set(
            item_id,
            annotator,
            str(body.get("label")),
            body.get("category") or None,
            note,
            source="web",
        )
        history = len(self.store.history(item_id, annotator))
        return {"status": change.status, "item_id": item_id, **_label_json(change.label, history)}


class _Handler(LoopbackHandler):
    server: _ReviewHTTPServer

    def do_GET(self) -> None:
        if not self._host_ok():
            return
        app = self.server.app
        url = urlsplit(self.path)
        if url.path in ("/", "/index.html"):
            self._send(HTTPStatus.OK, PAGE.encode(), "text/html; charset=utf-8")
        elif url.path == "/favicon.ico":
            self._send(HTTPStatus.NO_CONTENT, b"", "image/x-icon")
        elif url.path == "/api/pilot":
            self._send(HTTPStatus.OK, app.pilot_json, "application/json")
        elif url.path == "/api/labels":
            annotator = parse_qs(url.query).get("annotator", [""])[0]
            try:
                self._json(HTTPStatus.OK, app.labels_of(annotator))
            except InputError as exc:
                self._error(HTTPStatus.BAD_REQUEST, str(exc))
        elif match := _SHA256.match(url.path):
            # Only frames this pilot lists: the URL names a hash, never a path.
            self.serve_frame(app.frames.get(match.group(1)), "no such frame in this pilot")
        else:
            self._error(HTTPStatus.NOT_FOUND, f"no page {url.path}")

    def do_POST(self) -> None:
        if not self._host_ok():
            return
        if urlsplit(self.path).path != "/api/labels":
            self._error(HTTPStatus.NOT_FOUND, "no such endpoint")
            return
        body = self.read_json(MAX_BODY, "a label")
        if body is None:
            return
        try:
            self._json(HTTPStatus.OK, self.server.app.save(body))
        except VkrError as exc:
            self._error(HTTPStatus.BAD_REQUEST, str(exc))


class _ReviewHTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], app: ReviewApp):
        self.app = app
        self.host = address[0]
        super().__init__(address, _Handler)


class ReviewServer(LoopbackServer):
    thread_name = "vkr-review"

    """``with ReviewServer(pilot_dir) as server: server.url`` serves the page in a thread."""

    def __init__(
        self,
        pilot_dir: str | Path,
        host: str = "127.0.0.1",
        port: int = 0,
        annotator: str | None = None,
    ):
        host = check_host(host)
        if annotator is not None:
            annotator = check_annotator(annotator)
        self.app = ReviewApp(open_pilot(pilot_dir), annotator)
        self.listen(_ReviewHTTPServer, host, port)
