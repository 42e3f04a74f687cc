"""A loopback YouTube Data API v3 server, and video files for yt-dlp, scripted by a test.

It answers ``GET /youtube/v3/search`` and ``GET /youtube/v3/videos`` in the API's own shapes
(``youtube#searchListResponse``, ``youtube#videoListResponse``, and its error body
``{"error": {"code", "message", "errors": [{"message", "domain", "reason"}], "status"}}``),
checks the ``key`` parameter, keeps its own quota (search 100 units, videos 1) and counts
requests and units per method, so a test can prove the client paid for nothing twice. It
serves ``GET /videos/<id>.mp4`` (real H.264 files made with PyAV) for yt-dlp's generic
extractor, with switchable failures. Ships in the package so plugin authors test the same way.
"""

from __future__ import annotations

import asyncio
import functools
import tempfile
import threading
from collections import Counter, deque
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

from aiohttp import web

from vkr_core.schemas import InputError

METHOD_COST = {"search": 100, "videos": 1}
ERRORS: dict[str, tuple[int, str, str, str, str]] = {
    # kind: (HTTP status, domain, reason, status, message)
    "quotaExceeded": (
        403,
        "youtube.quota",
        "quotaExceeded",
        "PERMISSION_DENIED",
        'The request cannot be completed because you have exceeded your <a href="/youtube/v3/getting-started#quota">quota</a>.',
    ),
    "rateLimitExceeded": (
        403,
        "usageLimits",
        "rateLimitExceeded",
        "PERMISSION_DENIED",
        "The request cannot be completed because you have exceeded the rate limit.",
    ),
    "tooManyRequests": (
        429,
        "usageLimits",
        "rateLimitExceeded",
        "RESOURCE_EXHAUSTED",
        "Resource has been exhausted (e.g. check quota).",
    ),
    "backendError": (503, "global", "backendError", "UNAVAILABLE", "Backend Error"),
    "keyInvalid": (
        400,
        "usageLimits",
        "keyInvalid",
        "INVALID_ARGUMENT",
        "API key not valid. Please pass a valid API key.",
    ),
    "forbidden": (
        403,
        "global",
        "forbidden",
        "PERMISSION_DENIED",
        "The request is missing a valid API key.",
    ),
}


@dataclass
class FakeVideo:
    """One video the fake YouTube knows; ``keywords`` are the searches that find it."""

    video_id: str
    title: str
    keywords: tuple[str, ...] = ()
    description: str = ""
    channel: str = "Open Lab"
    channel_id: str = "UCopenlab0000000000000000"
    duration: str = "PT4M13S"
    license: str = "creativeCommon"
    published_at: str = "2024-03-01T12:00:00Z"
    # Videos of different shades have different frames (so image moderation can tell them
    # apart); the same shade serves the very same file.
    shade: int = 0


@functools.cache
def clip_file(shade: int = 0) -> Path:
    """A real one-second H.264 mp4 (64x48, 10 fps), made once per process and shade."""
    import av
    import numpy as np

    folder = Path(tempfile.mkdtemp(prefix="vkr-fake-youtube-"))
    path = folder / f"clip-{shade}.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for i in range(10):
            image = np.full((48, 64, 3), 40 + 20 * i, np.uint8)
            image[:, :, 2] = (37 * shade) % 256
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts, frame.time_base = i, Fraction(1, 10)
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return path


class FakeYouTubeServer:
    """The fake YouTube: ``start()`` returns the API base (``http://127.0.0.1:PORT/youtube/v3``).

    Script it with ``add_videos``, ``fail_next(method, kind, times)`` (kinds: ``ERRORS``),
    ``quota_limit`` (units a day; None for no limit), ``new_day()``, ``leave_out`` (ids
    videos.list omits) and ``file_failures`` (id -> 404, 403 or 429 for the mp4).
    """

    def __init__(
        self,
        videos: tuple[FakeVideo, ...] | list[FakeVideo] = (),
        api_key: str = "AIzaFakeYouTubeKey-0123456789abcdefghij",
        quota_limit: int | None = None,
        match: str = "exact",
    ) -> None:
        self.api_key = api_key
        # "exact": a query finds the videos with that keyword; "contains": the videos one of
        # whose keywords is in the query, as a real search finds a video by a few words of it
        # (for pipelines whose queries a model writes).
        if match not in ("exact", "contains"):
            raise InputError(f"match is 'exact' or 'contains', not {match!r}")
        self.match = match
        self.videos: dict[str, FakeVideo] = {}
        self.add_videos(videos)
        self.quota_limit = quota_limit
        self.leave_out: set[str] = set()
        self.file_failures: dict[str, int] = {}
        self._failures: dict[str, deque[str]] = {"search": deque(), "videos": deque()}
        self._lock = threading.Lock()
        self.requests: Counter[str] = Counter()
        self.units: Counter[str] = Counter()
        self.units_today = 0
        # (method, q or id list) of every request answered with 200.
        self.answered: list[tuple[str, str]] = []
        self.file_requests: Counter[str] = Counter()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self.root_url: str | None = None

    # -- scripting

    def add_videos(self, videos: Any) -> None:
        for video in videos:
            self.videos[video.video_id] = video

    def fail_next(self, method: str, kind: str, times: int = 1) -> None:
        if kind not in ERRORS:
            raise InputError(f"unknown fake YouTube failure {kind!r} (known: {', '.join(ERRORS)})")
        with self._lock:
            self._failures[method].extend([kind] * times)

    def new_day(self) -> None:
        """The quota resets, as at midnight Pacific."""
        with self._lock:
            self.units_today = 0

    @property
    def base_url(self) -> str:
        assert self.root_url is not None, "start the server first"
        return f"{self.root_url}/youtube/v3"

    @property
    def file_url_template(self) -> str:
        assert self.root_url is not None, "start the server first"
        return f"{self.root_url}/videos/{{id}}.mp4"

    # -- the API

    def _error(self, kind: str) -> web.Response:
        status, domain, reason, state, message = ERRORS[kind]
        body = {
            "error": {
                "code": status,
                "message": message,
                "errors": [{"message": message, "domain": domain, "reason": reason}],
                "status": state,
            }
        }
        return web.json_response(body, status=status)

    def _refusal(self, request: web.Request, method: str) -> web.Response | None:
        """A scripted or quota refusal, charged the way YouTube charges: everything answered
        except quota and key refusals."""
        key = request.query.get("key")
        with self._lock:
            self.requests[method] += 1
            if not key:
                return self._error("forbidden")
            if key != self.api_key:
                return self._error("keyInvalid")
            cost = METHOD_COST[method]
            scripted = self._failures[method].popleft() if self._failures[method] else None
            if scripted in ("quotaExceeded", "keyInvalid", "forbidden"):
                return self._error(scripted)
            if self.quota_limit is not None and self.units_today + cost > self.quota_limit:
                return self._error("quotaExceeded")
            self.units[method] += cost
            self.units_today += cost
            return self._error(scripted) if scripted else None

    async def _search(self, request: web.Request) -> web.Response:
        refusal = self._refusal(request, "search")
        if refusal is not None:
            return refusal
        q = request.query.get("q", "")
        if request.query.get("part") != "snippet":
            return self._bad_request("part", "search.list supports only part=snippet")
        if "videoLicense" in request.query and request.query.get("type") != "video":
            return self._bad_request(
                "type", "videoLicense requires the type parameter to be set to video."
            )
        limit = min(int(request.query.get("maxResults", "5")), 50)
        # videoLicense is not applied: YouTube's own filter is known to let non-CC videos
        # through, so a client must check status.license from videos.list, and tests see it.
        hits = [v for v in self.videos.values() if self._finds(q, v)]
        items = [
            {
                "kind": "youtube#searchResult",
                "etag": f"etag-{v.video_id}",
                "id": {"kind": "youtube#video", "videoId": v.video_id},
                "snippet": {
                    "publishedAt": v.published_at,
                    "channelId": v.channel_id,
                    "title": v.title,
                    "description": v.description[:160],
                    "thumbnails": {},
                    "channelTitle": v.channel,
                    "liveBroadcastContent": "none",
                    "publishTime": v.published_at,
                },
            }
            for v in hits[:limit]
        ]
        with self._lock:
            self.answered.append(("search", q))
        return web.json_response(
            {
                "kind": "youtube#searchListResponse",
                "etag": "etag-search",
                "nextPageToken": "CAoQAA" if len(hits) > limit else None,
                "regionCode": "US",
                "pageInfo": {"totalResults": len(hits), "resultsPerPage": limit},
                "items": items,
            }
        )

    def _finds(self, q: str, video: FakeVideo) -> bool:
        query = q.lower()
        if self.match == "contains":
            return any(k.lower() in query for k in video.keywords)
        return query in (k.lower() for k in video.keywords)

    def _bad_request(self, parameter: str, message: str) -> web.Response:
        body = {
            "error": {
                "code": 400,
                "message": message,
                "errors": [
                    {
                        "message": message,
                        "domain": "youtube.parameter",
                        "reason": "invalidParameter",
                        "location": parameter,
                        "locationType": "parameter",
                    }
                ],
                "status": "INVALID_ARGUMENT",
            }
        }
        return web.json_response(body, status=400)

    async def _videos(self, request: web.Request) -> web.Response:
        refusal = self._refusal(request, "videos")
        if refusal is not None:
            return refusal
        ids = [i for i in request.query.get("id", "").split(",") if i]
        if len(ids) > 50:
            return self._bad_request("id", "The request specifies more than 50 video ids.")
        parts = set(request.query.get("part", "").split(","))
        items = []
        for vid in ids:
            video = self.videos.get(vid)
            if video is None or vid in self.leave_out:
                continue
            item: dict[str, Any] = {"kind": "youtube#video", "etag": f"etag-{vid}", "id": vid}
            if "snippet" in parts:
                item["snippet"] = {
                    "publishedAt": video.published_at,
                    "channelId": video.channel_id,
                    "title": video.title,
                    "description": video.description,
                    "thumbnails": {},
                    "channelTitle": video.channel,
                    "categoryId": "27",
                    "liveBroadcastContent": "none",
                }
            if "contentDetails" in parts:
                item["contentDetails"] = {
                    "duration": video.duration,
                    "dimension": "2d",
                    "definition": "hd",
                    "caption": "false",
                    "licensedContent": False,
                    "contentRating": {},
                    "projection": "rectangular",
                }
            if "status" in parts:
                item["status"] = {
                    "uploadStatus": "processed",
                    "privacyStatus": "public",
                    "license": video.license,
                    "embeddable": True,
                    "publicStatsViewable": True,
                    "madeForKids": False,
                }
            items.append(item)
        with self._lock:
            self.answered.append(("videos", ",".join(ids)))
        return web.json_response(
            {
                "kind": "youtube#videoListResponse",
                "etag": "etag-videos",
                "items": items,
                "pageInfo": {"totalResults": len(items), "resultsPerPage": len(items)},
            }
        )

    async def _file(self, request: web.Request) -> web.StreamResponse:
        vid = request.match_info["id"]
        with self._lock:
            self.file_requests[vid] += 1
        failure = self.file_failures.get(vid)
        if failure is not None:
            raise _status(failure)
        video = self.videos.get(vid)
        if video is None:
            raise web.HTTPNotFound()
        return web.FileResponse(clip_file(video.shade), headers={"Content-Type": "video/mp4"})

    # -- lifecycle

    def start(self) -> str:
        """Serve on a free port of 127.0.0.1; returns the API base URL."""
        clip_file()
        ready = threading.Event()

        def serve() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            asyncio.set_event_loop(loop)
            self.root_url = loop.run_until_complete(self._open())
            ready.set()
            try:
                loop.run_forever()
            finally:
                loop.close()

        self._thread = threading.Thread(target=serve, name="vkr-fake-youtube", daemon=True)
        self._thread.start()
        ready.wait(30)
        return self.base_url

    async def _open(self) -> str:
        app = web.Application()
        app.router.add_get("/youtube/v3/search", self._search)
        app.router.add_get("/youtube/v3/videos", self._videos)
        app.router.add_get("/videos/{id}.mp4", self._file)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0, shutdown_timeout=1.0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return f"http://127.0.0.1:{port}"

    def stop(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), loop).result(timeout=30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=30)
        self._loop = self._thread = self._runner = None

    def __enter__(self) -> FakeYouTubeServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _status(code: int) -> web.HTTPException:
    kinds: dict[int, type[web.HTTPException]] = {
        403: web.HTTPForbidden,
        404: web.HTTPNotFound,
        429: web.HTTPTooManyRequests,
        500: web.HTTPInternalServerError,
    }
    return kinds.get(code, web.HTTPInternalServerError)()
