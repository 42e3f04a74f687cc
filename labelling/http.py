"""The loopback page server every labelling page runs on (the pilot's and experts/').

Loopback only, stdlib ``http.server``. A page answers only requests addressed to its own
loopback host (a DNS-rebinding page cannot reach it), takes changes only as JSON posts (a
cross-site form cannot send them) and serves frames only by the names its app lists.
"""

from __future__ import annotations

import ipaddress
import json
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Self

from vkr_core.schemas import InputError

# What a page accepts in one post: a label, a seed, a question with its options and reasoning
# fit with room to spare; more is not something a person typed.
MAX_BODY = 64 * 1024


def check_host(host: str, page: str = "the page", keeps: str = "its inputs and labels") -> str:
    """The host if it is an IPv4 loopback address (localhost is 127.0.0.1); else InputError
    "{page} serves on 127.0.0.1 only ...", saying that ``keeps`` stays on this machine."""
    if host == "localhost":
        return "127.0.0.1"
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        address = None
    if address is None or address.version != 4 or not address.is_loopback:
        raise InputError(
            f"{page} serves on 127.0.0.1 only, not on {host!r}: {keeps} stay on this machine"
            " (use an SSH tunnel to reach it from elsewhere)"
        )
    return host


class LoopbackHandler(BaseHTTPRequestHandler):
    """What every page's handler shares: no-store, no-sniff, no-frame replies, JSON errors,
    JSON bodies read with their checks, frames, and only requests addressed to the loopback
    host."""

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

    def read_json(self, max_bytes: int, what: str) -> dict[str, Any] | None:
        """The posted JSON object; or None after replying with the JSON error (415 when not
        posted as JSON, 413 when over ``max_bytes``, 400 when not a JSON object). ``what``
        names the body in those errors ("a label", "a seed")."""
        if self.headers.get_content_type() != "application/json":
            self._error(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, f"{what} is posted as JSON")
            return None
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if length < 0:
            self._error(HTTPStatus.BAD_REQUEST, "Content-Length is not a byte count")
            return None
        if length > max_bytes:
            # The body stays unread: close the connection rather than parse it as a request.
            self.close_connection = True
            self._error(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                f"{what} is {length} bytes, more than the {max_bytes} this page takes",
            )
            return None
        try:
            body = json.loads(self.rfile.read(length) or b"{}")
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            self._error(HTTPStatus.BAD_REQUEST, f"{what} is not JSON: {exc}")
            return None
        if not isinstance(body, dict):
            self._error(
                HTTPStatus.BAD_REQUEST, f"{what} is a JSON object, not {type(body).__name__}"
            )
            return None
        return body

    def serve_frame(self, path: Path | None, missing: str = "no such frame") -> None:
        """The JPEG at ``path`` (one the app listed: a URL never names a path), else 404."""
        try:
            data = path.read_bytes() if path is not None else None
        except OSError:
            data = None
        if data is None:
            self._error(HTTPStatus.NOT_FOUND, missing)
            return
        self._send(HTTPStatus.OK, data, "image/jpeg")


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
