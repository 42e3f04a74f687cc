"""labelling.http: the loopback page server, through a real server on 127.0.0.1."""

from __future__ import annotations

import http.client
import json
from http import HTTPStatus
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from labelling.http import LoopbackHandler, LoopbackServer, check_host
from vkr_core.schemas import InputError

MAX_BODY = 1024


class _App:
    def __init__(self, frames: dict[str, Path]):
        self.frames = frames
        self.saved: list[dict[str, Any]] = []
        self.closed = False

    def close(self) -> None:
        self.closed = True


class _Handler(LoopbackHandler):
    def do_GET(self) -> None:
        if not self._host_ok():
            return
        self.serve_frame(self.server.app.frames.get(self.path.removeprefix("/frames/")))

    def do_POST(self) -> None:
        if not self._host_ok():
            return
        body = self.read_json(MAX_BODY, "a label")
        if body is None:
            return
        self.server.app.saved.append(body)
        self._json(HTTPStatus.OK, {"saved": body})


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], app: _App):
        self.app = app
        self.host = address[0]
        super().__init__(address, _Handler)


class _Server(LoopbackServer):
    def __init__(self, app: _App, host: str = "127.0.0.1"):
        self.app = app
        self.listen(_HTTPServer, check_host(host, "the test page"), 0)


def _request(
    server: _Server,
    method: str,
    path: str,
    body: bytes = b"",
    headers: dict[str, str] | None = None,
) -> tuple[int, bytes, str]:
    port = server.httpd.server_address[1]
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, response.read(), response.getheader("Content-Type") or ""
    finally:
        connection.close()


def _error(data: bytes) -> str:
    return json.loads(data)["error"]


@pytest.fixture
def page(tmp_path: Path):
    frame = tmp_path / "f.jpg"
    frame.write_bytes(b"\xff\xd8\xff\xe0 a jpeg")
    app = _App({"a.jpg": frame, "gone.jpg": tmp_path / "gone.jpg"})
    with _Server(app) as server:
        yield server
    assert app.closed


def test_a_json_object_is_read_and_everything_else_gets_a_clear_json_error(page: _Server) -> None:
    json_headers = {"Content-Type": "application/json"}
    status, data, _ = _request(page, "POST", "/", b'{"label": "ok"}', json_headers)
    assert status == 200 and json.loads(data) == {"saved": {"label": "ok"}}

    status, data, kind = _request(
        page, "POST", "/", b"label=ok", {"Content-Type": "application/x-www-form-urlencoded"}
    )
    assert (status, _error(data), kind) == (415, "a label is posted as JSON", "application/json")

    status, data, _ = _request(page, "POST", "/", b"x" * (MAX_BODY + 1), json_headers)
    assert status == 413
    assert _error(data) == "a label is 1025 bytes, more than the 1024 this page takes"

    status, data, _ = _request(page, "POST", "/", b'{"label": ', json_headers)
    assert status == 400 and _error(data).startswith("a label is not JSON: Expecting value")

    status, data, _ = _request(page, "POST", "/", b'["ok"]', json_headers)
    assert (status, _error(data)) == (400, "a label is a JSON object, not list")

    status, data, _ = _request(page, "POST", "/", b"\xff\xfe", json_headers)
    assert status == 400 and _error(data).startswith("a label is not JSON")
    # Only the one good body reached the app.
    assert page.app.saved == [{"label": "ok"}]

    # A rebinding page's Host is refused before the body is looked at.
    status, data, _ = _request(
        page, "POST", "/", b"{}", {**json_headers, "Host": "attacker.example"}
    )
    assert status == 403 and page.app.saved == [{"label": "ok"}]


def test_frames_are_served_by_the_name_the_app_lists_and_404_otherwise(page: _Server) -> None:
    status, data, kind = _request(page, "GET", "/frames/a.jpg")
    assert (status, data[:2], kind) == (200, b"\xff\xd8", "image/jpeg")
    for name in ("missing.jpg", "gone.jpg", "../f.jpg"):
        status, data, kind = _request(page, "GET", f"/frames/{name}")
        assert (status, _error(data), kind) == (404, "no such frame", "application/json")


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.10", "::1", "example.org"])
def test_a_page_serves_on_loopback_only_and_says_so_in_its_own_words(host: str) -> None:
    with pytest.raises(
        InputError,
        match=rf"^the seed page serves on 127\.0\.0\.1 only, not on {host!r}: its inputs and"
        r" labels stay on this machine \(use an SSH tunnel",
    ):
        check_host(host, "the seed page")
    assert check_host("localhost") == "127.0.0.1"
    assert check_host("127.0.0.2") == "127.0.0.2"
