"""The review page: a local web server where experts label a pilot's items.

Loopback only, stdlib ``http.server``, one HTML page with plain JavaScript. Every label is
written to the pilot's labels.sqlite the moment it is given. The server answers only
requests addressed to its own loopback host (a DNS-rebinding page cannot reach it) and
takes labels only as JSON posts (a cross-site form cannot send them).
"""

from __future__ import annotations

import html
import ipaddress
import json
import re
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Self
from urllib.parse import parse_qs, urlsplit

from qualification.labels import LabelStore, check_annotator
from qualification.models import AUTO_ANNOTATOR, CATEGORIES, Label, PilotItem
from qualification.pilot import Pilot, open_pilot
from qualification.review_page import PAGE
from vkr_core.context import FENCE_TAG
from vkr_core.schemas import InputError, VkrError

MAX_BODY = 64 * 1024
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
    """The host if it is an IPv4 loopback address (or localhost); else InputError."""
    if host == "localhost":
        return "127.0.0.1"
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        address = None
    if address is None or address.version != 4 or not address.is_loopback:
        raise InputError(
            f"the review page serves on 127.0.0.1 only, not on {host!r}: pilot inputs and "
            "labels stay on this machine (use an SSH tunnel to review from elsewhere)"
        )
    return host


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


class LoopbackHandler(BaseHTTPRequestHandler):
    """What every page's handler shares (the pilot page's and experts/'): no-store, no-sniff,
    no-frame replies, JSON errors, and only requests addressed to the loopback host."""

    server: Any  # a page's ThreadingHTTPServer with ``host`` (the address it listens on)
    protocol_version = "HTTP/1.1"
    # Headers and body go out as two writes: with Nagle's algorithm on, a keep-alive
    # client's delayed ACK holds the body back ~40 ms on every label.
    disable_nagle_algorithm = True

    def log_message(self, format: str, *args: Any) -> None:
        pass  # a line per thumbnail would bury the URL the user needs

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("X-Frame-Options", "DENY")
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, data: Any) -> None:
        self._send(status, json.dumps(data).encode(), "application/json")

    def _error(self, status: int, message: str) -> None:
        self._json(status, {"error": message})

    def _host_ok(self) -> bool:
        port = self.server.server_address[1]
        allowed = {f"127.0.0.1:{port}", f"localhost:{port}", f"{self.server.host}:{port}"}
        if self.headers.get("Host") not in allowed:
            self._error(HTTPStatus.FORBIDDEN, "requests must be addressed to the loopback host")
            return False
        return True


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
            path = app.frames.get(match.group(1))
            if path is None or not path.is_file():
                self._error(HTTPStatus.NOT_FOUND, "no such frame in this pilot")
                return
            self._send(HTTPStatus.OK, path.read_bytes(), "image/jpeg")
        else:
            self._error(HTTPStatus.NOT_FOUND, f"no page {url.path}")

    def do_POST(self) -> None:
        if not self._host_ok():
            return
        if urlsplit(self.path).path != "/api/labels":
            self._error(HTTPStatus.NOT_FOUND, "no such endpoint")
            return
        if self.headers.get_content_type() != "application/json":
            self._error(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, "labels are posted as JSON")
            return
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY:
            self._error(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, "label too large")
            return
        try:
            body = json.loads(self.rfile.read(length) or b"{}")
            if not isinstance(body, dict):
                raise InputError("a label is a JSON object")
            self._json(HTTPStatus.OK, self.server.app.save(body))
        except json.JSONDecodeError as exc:
            self._error(HTTPStatus.BAD_REQUEST, f"not JSON: {exc}")
        except VkrError as exc:
            self._error(HTTPStatus.BAD_REQUEST, str(exc))


class _ReviewHTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], app: ReviewApp):
        self.app = app
        self.host = address[0]
        super().__init__(address, _Handler)


class LoopbackServer:
    """A page's HTTP server on loopback, served in a thread; the app is closed with it.

    The pilot page and the expert pages (experts/) share it: a subclass checks its host and
    makes its app, then calls ``listen``. ``with Server(...) as server: server.url``.
    """

    thread_name = "vkr-page"
    app: Any
    httpd: ThreadingHTTPServer

    def listen(self, server_class: Any, host: str, port: int) -> None:
        try:
            self.httpd = server_class((host, port), self.app)
        except OSError as exc:
            self.app.close()
            raise InputError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
        self.url = f"http://{host}:{self.httpd.server_address[1]}/"
        self._thread: threading.Thread | None = None

    def start(self) -> str:
        self._thread = threading.Thread(
            target=self.httpd.serve_forever, name=self.thread_name, daemon=True
        )
        self._thread.start()
        return self.url

    def serve_forever(self) -> None:
        self.httpd.serve_forever()

    def stop(self) -> None:
        if self._thread is not None:
            self.httpd.shutdown()
            self._thread.join(timeout=10)
            self._thread = None
        self.httpd.server_close()
        self.app.close()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


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
