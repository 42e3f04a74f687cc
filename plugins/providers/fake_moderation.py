"""Loopback image moderation servers speaking the real protocols, for tests and plugin authors.

- :class:`FakeAzureContentSafety`: ``POST /contentsafety/image:analyze?api-version=2024-09-01``
  with ``Ocp-Apim-Subscription-Key``; replies ``{"categoriesAnalysis": [...]}``, Azure's
  error bodies (``{"error": {"code", "message"}}``), 401 for a wrong key, 429 with
  ``Retry-After``.
- :class:`FakeOpenAIModeration`: ``POST /v1/moderations`` with ``Authorization: Bearer``;
  replies ``{"id", "model", "results": [{"flagged", "categories", "category_scores", ...}]}``
  and OpenAI's error bodies.

Scores are a pure function of the image bytes: every image is safe unless a test marks its
sha256 (``server.mark(sha256, {"Violence": 6})``). ``server.script(["429", "500"])`` serves
those outcomes to the next requests; ``server.requests`` counts what arrived.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import threading
from collections import Counter
from typing import Any

from aiohttp import web

from plugins.providers.moderation import MAX_IMAGE_BYTES, OPENAI_CATEGORIES, AzureContentSafety

AZURE_CATEGORIES = AzureContentSafety.categories
AZURE_API_VERSION = AzureContentSafety.api_version


class _LoopbackServer:
    """An aiohttp app on 127.0.0.1 in a thread of its own; ``start()`` returns its URL."""

    def __init__(self, api_key: str, retry_after_s: int = 1):
        self.api_key = api_key
        self.retry_after_s = retry_after_s
        self.marked: dict[str, dict[str, float]] = {}
        self.requests = 0
        self.by_status: Counter[int] = Counter()
        self.images: list[str] = []  # sha256 of each image received, in order
        self._script: list[str] = []
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self.url: str | None = None

    # -- control

    def mark(self, sha256: str, scores: dict[str, float]) -> None:
        """Score the image with this sha256 so (other categories stay at 0)."""
        with self._lock:
            self.marked[sha256] = dict(scores)

    def script(self, outcomes: list[str]) -> None:
        """Serve these outcomes ("429", "500", "503") to the next requests, then normal."""
        with self._lock:
            self._script = list(outcomes)

    def reset_counts(self) -> None:
        with self._lock:
            self.requests = 0
            self.by_status = Counter()
            self.images = []

    def _next_outcome(self) -> str | None:
        with self._lock:
            self.requests += 1
            return self._script.pop(0) if self._script else None

    def _count(self, status: int) -> None:
        with self._lock:
            self.by_status[status] += 1

    # -- lifecycle

    def routes(self, app: web.Application) -> None:
        raise NotImplementedError

    def base_path(self) -> str:
        return ""

    def start(self) -> str:
        ready = threading.Event()

        def serve() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            asyncio.set_event_loop(loop)
            self.url = loop.run_until_complete(self._open())
            ready.set()
            try:
                loop.run_forever()
            finally:
                loop.close()

        self._thread = threading.Thread(target=serve, name=type(self).__name__, daemon=True)
        self._thread.start()
        ready.wait(30)
        assert self.url is not None
        return self.url

    async def _open(self) -> str:
        app = web.Application(client_max_size=2 * MAX_IMAGE_BYTES)
        self.routes(app)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0, shutdown_timeout=1.0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return f"http://127.0.0.1:{port}{self.base_path()}"

    def stop(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return

        async def close() -> None:
            if self._runner is not None:
                await self._runner.cleanup()

        asyncio.run_coroutine_threadsafe(close(), loop).result(timeout=30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=30)
        self._thread = self._loop = self._runner = None

    def __enter__(self) -> _LoopbackServer:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _respond(self, body: dict[str, Any], status: int = 200, **headers: str) -> web.Response:
        self._count(status)
        return web.json_response(body, status=status, headers=headers or None)


def _decode_image(content: Any) -> bytes | None:
    if not isinstance(content, str) or not content:
        return None
    try:
        return base64.b64decode(content, validate=True)
    except (binascii.Error, ValueError):
        return None


class FakeAzureContentSafety(_LoopbackServer):
    """Azure AI Content Safety's ``image:analyze`` on loopback; ``url`` is the endpoint."""

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/contentsafety/image:analyze", self._analyze)

    def _error(self, status: int, code: str, message: str, **headers: str) -> web.Response:
        return self._respond({"error": {"code": code, "message": message}}, status, **headers)

    async def _analyze(self, request: web.Request) -> web.Response:
        outcome = self._next_outcome()
        if request.headers.get("Ocp-Apim-Subscription-Key") != self.api_key:
            # What Azure's gateway says, word for word: the key itself is never echoed.
            return self._error(
                401,
                "401",
                "Access denied due to invalid subscription key or wrong API endpoint. Make "
                "sure to provide a valid key for an active subscription and use a correct "
                "regional API endpoint for your resource.",
            )
        if request.query.get("api-version") != AZURE_API_VERSION:
            return self._error(
                404,
                "404",
                f"The api-version {request.query.get('api-version')!r} is not supported: "
                "use 2024-09-01",
            )
        if outcome == "429":
            return self._error(
                429,
                "TooManyRequests",
                "The current requests-per-second has exceeded the quota for your current tier.",
                **{"Retry-After": str(self.retry_after_s)},
            )
        if outcome in ("500", "503"):
            code = "InternalError" if outcome == "500" else "ServerBusy"
            return self._error(int(outcome), code, "Please retry after a short period.")
        try:
            body = await request.json()
        except ValueError:
            return self._error(400, "InvalidRequestBody", "The request body is not valid JSON.")
        image = body.get("image") if isinstance(body, dict) else None
        data = _decode_image(image.get("content") if isinstance(image, dict) else None)
        if data is None:
            return self._error(
                400,
                "InvalidRequestBody",
                "One or more fields in the request body do not match the API definition: "
                "image.content must be base64.",
            )
        if len(data) > MAX_IMAGE_BYTES:
            return self._error(400, "InvalidRequestBody", "The image is larger than 4 MB.")
        categories = body.get("categories") or list(AZURE_CATEGORIES)
        unknown = [c for c in categories if c not in AZURE_CATEGORIES]
        if unknown:
            return self._error(400, "InvalidRequestBody", f"Unknown categories: {unknown}.")
        digest = hashlib.sha256(data).hexdigest()
        with self._lock:
            self.images.append(digest)
            marked = self.marked.get(digest, {})
        return self._respond(
            {
                "categoriesAnalysis": [
                    {"category": c, "severity": int(marked.get(c, 0))} for c in categories
                ]
            }
        )


class FakeOpenAIModeration(_LoopbackServer):
    """OpenAI's ``/v1/moderations`` on loopback; ``url`` is the API base (ending in /v1)."""

    def base_path(self) -> str:
        return "/v1"

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/v1/moderations", self._moderate)

    def _error(
        self, status: int, message: str, kind: str, code: str | None, **headers: str
    ) -> web.Response:
        body = {"error": {"message": message, "type": kind, "param": None, "code": code}}
        return self._respond(body, status, **headers)

    async def _moderate(self, request: web.Request) -> web.Response:
        outcome = self._next_outcome()
        auth = request.headers.get("Authorization", "")
        key = auth.removeprefix("Bearer ")
        if key != self.api_key:
            # OpenAI echoes the key masked, as here: first and last four characters.
            masked = f"{key[:4]}{'*' * max(0, len(key) - 8)}{key[-4:]}" if key else "(none)"
            return self._error(
                401,
                f"Incorrect API key provided: {masked}. You can find your API key at "
                "https://platform.openai.com/account/api-keys.",
                "invalid_request_error",
                "invalid_api_key",
            )
        if outcome == "429":
            return self._error(
                429,
                "Rate limit reached for omni-moderation-latest. Please try again in 1s.",
                "requests",
                "rate_limit_exceeded",
                **{"Retry-After": str(self.retry_after_s)},
            )
        if outcome in ("500", "503"):
            return self._error(
                int(outcome),
                "The server had an error processing your request.",
                "server_error",
                None,
            )
        try:
            body = await request.json()
        except ValueError:
            return self._error(
                400, "We could not parse the JSON body.", "invalid_request_error", None
            )
        parts = body.get("input") if isinstance(body, dict) else None
        if isinstance(parts, dict):
            parts = [parts]
        images: list[bytes] = []
        for part in parts if isinstance(parts, list) else []:
            if not isinstance(part, dict) or part.get("type") not in ("image_url", "text"):
                return self._error(
                    400,
                    "Invalid input part: expected 'text' or 'image_url'.",
                    "invalid_request_error",
                    None,
                )
            if part["type"] == "image_url":
                url = (part.get("image_url") or {}).get("url", "")
                data = _decode_image(url.split(",", 1)[1] if url.startswith("data:") else None)
                if data is None:
                    return self._error(
                        400,
                        "Invalid image: expected a base64 data URL.",
                        "invalid_request_error",
                        None,
                    )
                images.append(data)
        if not images:
            return self._error(400, "'input' has no image.", "invalid_request_error", None)
        marked: dict[str, float] = {}
        with self._lock:
            for data in images:
                digest = hashlib.sha256(data).hexdigest()
                self.images.append(digest)
                for category, score in self.marked.get(digest, {}).items():
                    marked[category] = max(marked.get(category, 0.0), score)
        # A safe image still scores a little: real scores are never all exactly zero.
        scores = {c: marked.get(c, 0.0001) for c in OPENAI_CATEGORIES}
        model = str(body.get("model") or "omni-moderation-latest")
        return self._respond(
            {
                "id": f"modr-fake-{hashlib.sha256(images[0]).hexdigest()[:20]}",
                "model": model,
                "results": [
                    {
                        "flagged": any(s >= 0.5 for s in scores.values()),
                        "categories": {c: s >= 0.5 for c, s in scores.items()},
                        "category_scores": scores,
                        "category_applied_input_types": {c: ["image"] for c in OPENAI_CATEGORIES},
                    }
                ],
            }
        )
