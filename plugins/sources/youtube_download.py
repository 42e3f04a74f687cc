"""Download YouTube videos with yt-dlp (as a library): at most 720p mp4, each video once.

yt-dlp's download archive (``archive.txt`` in the output folder) is what makes "never twice"
hold across runs; a video in it is not fetched again, not even its page. Failures are
classified from yt-dlp's messages into reasons a collection report can count, and a rate
limit (HTTP 429, a bot check) pauses before the next try instead of burning the next video.
Each downloaded file gets ``<id>.attribution.json`` beside it: what CC BY asks a reuser to
keep (channel, title, URL, licence, date).
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import ValidationError

from plugins.sources.youtube import WATCH_URL, Candidate
from vkr_core.errors import describe_validation_error
from vkr_core.files import atomic_write
from vkr_core.log import redact
from vkr_core.schemas import InputError, Strict, check_video_id

ARCHIVE_FILE = "archive.txt"
MAX_HEIGHT = 720
# YouTube's Creative Commons licence is CC BY 3.0 (its only CC option).
CC_LICENCE = "CC BY 3.0 (YouTube creativeCommon)"

FailureReason = Literal[
    "private",
    "unavailable",
    "age_restricted",
    "geo_restricted",
    "bot_check",
    "rate_limited",
    "forbidden",
    "error",
]

# (reason, fragments of yt-dlp's messages), first match wins: more specific ones first.
_CLASSIFIERS: tuple[tuple[FailureReason, tuple[str, ...]], ...] = (
    ("bot_check", ("confirm you're not a bot", "not a bot")),
    (
        "age_restricted",
        ("confirm your age", "age-restricted", "age restricted", "inappropriate for some users"),
    ),
    (
        "geo_restricted",
        ("available in your country", "geo restrict", "geo-restrict", "from your location"),
    ),
    ("private", ("private video", "video is private")),
    ("rate_limited", ("http error 429", "too many requests", "rate-limit", "rate limit")),
    (
        "unavailable",
        (
            "video unavailable",
            "is unavailable",
            "http error 404",
            "has been removed",
            "no longer available",
            "does not exist",
            "account associated with this video has been terminated",
        ),
    ),
    ("forbidden", ("http error 403",)),
)


def classify_download_error(message: str) -> FailureReason:
    """The reason behind one of yt-dlp's error messages."""
    text = message.lower().replace("\u2019", "'")
    for reason, fragments in _CLASSIFIERS:
        if any(fragment in text for fragment in fragments):
            return reason
    return "error"


def format_selector(ffmpeg: bool) -> str:
    """At most 720p, mp4; separate video and audio streams only when ffmpeg can merge them."""
    single = f"b[height<=?{MAX_HEIGHT}][ext=mp4]"
    if not ffmpeg:
        return single
    return f"bv*[height<=?{MAX_HEIGHT}][ext=mp4]+ba[ext=m4a]/{single}"


class Attribution(Strict):
    """What CC BY asks a reuser to keep, written next to the file as ``<id>.attribution.json``."""

    video_id: str
    title: str
    description: str = ""
    channel: str
    channel_id: str = ""
    url: str
    license: str
    published_at: str
    duration_seconds: float | None = None
    downloaded_from: str
    downloaded_at: str


class DownloadOutcome(Strict):
    video_id: str
    status: Literal["downloaded", "already", "failed"]
    path: str | None = None
    reason: FailureReason | None = None
    message: str = ""
    attempts: int = 0
    # The attribution's licence (CC BY text for YouTube's creativeCommon), when downloaded.
    licence: str | None = None


def read_attribution(folder: str | Path, video_id: str) -> Attribution | None:
    """The attribution next to a downloaded video, or None when there is none."""
    path = Path(folder) / f"{video_id}.attribution.json"
    if not path.is_file():
        return None
    try:
        return Attribution.model_validate_json(path.read_bytes())
    except ValidationError as exc:
        raise InputError(f"{path}: {describe_validation_error(exc)}") from None


class _Quiet:
    """yt-dlp's logger: keep the last error for the outcome, print nothing."""

    def __init__(self) -> None:
        self.errors: list[str] = []

    def debug(self, msg: str) -> None:
        pass

    def info(self, msg: str) -> None:
        pass

    def warning(self, msg: str) -> None:
        pass

    def error(self, msg: str) -> None:
        self.errors.append(msg)


def _one_line(message: str) -> str:
    text = " ".join(message.split()).removeprefix("ERROR: ")
    return redact(text[:500])


class YouTubeDownloader:
    """Downloads into ``out_dir`` through yt-dlp; one instance per folder.

    ``url_template`` (``http://127.0.0.1:PORT/videos/{id}.mp4``) replaces the watch URL so
    tests fetch through yt-dlp's generic extractor. ``min_interval_seconds`` spaces the
    downloads; a rate-limited or bot-checked video waits ``pause_seconds`` (doubling) and
    is tried again up to ``rate_limit_attempts`` times.
    """

    def __init__(
        self,
        out_dir: str | Path,
        *,
        url_template: str | None = None,
        retries: int = 3,
        min_interval_seconds: float = 2.0,
        pause_seconds: float = 60.0,
        rate_limit_attempts: int = 3,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if url_template is not None and "{id}" not in url_template:
            raise InputError(f"download URL template {url_template!r} has no {{id}}")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.archive = self.out_dir / ARCHIVE_FILE
        self.url_template = url_template
        self.retries = retries
        self.min_interval_seconds = min_interval_seconds
        self.pause_seconds = pause_seconds
        self.rate_limit_attempts = rate_limit_attempts
        self.sleep = sleep
        self.clock = clock
        self._last_download: float | None = None

    def url_for(self, video_id: str) -> str:
        return (self.url_template or WATCH_URL).format(id=video_id)

    def archived(self) -> set[str]:
        """Ids in yt-dlp's archive (lines ``<extractor> <id>``)."""
        if not self.archive.is_file():
            return set()
        return {
            parts[1]
            for line in self.archive.read_text().splitlines()
            if len(parts := line.split()) == 2
        }

    def _options(self, video_id: str, logger: _Quiet) -> dict[str, Any]:
        return {
            "format": format_selector(shutil.which("ffmpeg") is not None),
            "merge_output_format": "mp4",
            # The file is named by the YouTube id whatever the extractor calls it.
            "outtmpl": {"default": str(self.out_dir / f"{video_id}.%(ext)s")},
            "download_archive": str(self.archive),
            "retries": self.retries,
            "fragment_retries": self.retries,
            "extractor_retries": self.retries,
            "noplaylist": True,
            "quiet": True,
            "no_warnings": True,
            "noprogress": True,
            "logger": logger,
            "socket_timeout": 30,
        }

    def _space_out(self) -> None:
        if self._last_download is not None:
            wait = self.min_interval_seconds - (self.clock() - self._last_download)
            if wait > 0:
                self.sleep(wait)

    def download(self, video_id: str, candidate: Candidate | None = None) -> DownloadOutcome:
        """Download one video (once: an archived one is left alone) and write its attribution."""
        import yt_dlp

        check_video_id(video_id)
        if video_id in self.archived():
            path = self.out_dir / f"{video_id}.mp4"
            try:
                attribution = read_attribution(self.out_dir, video_id)
            except InputError:
                # A damaged attribution says nothing about the file: it is still there.
                attribution = None
            return DownloadOutcome(
                video_id=video_id,
                status="already",
                path=str(path) if path.is_file() else None,
                licence=attribution.license if attribution else None,
            )
        url = self.url_for(video_id)
        pause = self.pause_seconds
        attempts = 0
        while True:
            attempts += 1
            self._space_out()
            logger = _Quiet()
            reason: FailureReason | None = None
            try:
                with yt_dlp.YoutubeDL(self._options(video_id, logger)) as ydl:  # type: ignore[arg-type]
                    info = ydl.extract_info(url, download=True)
            except yt_dlp.utils.DownloadError as exc:
                message = _one_line(str(exc) or (logger.errors[-1] if logger.errors else ""))
                reason = classify_download_error(message)
            else:
                message = ""
            finally:
                self._last_download = self.clock()
            if reason is None:
                return self._finish(video_id, url, info or {}, candidate, attempts)
            if reason in ("rate_limited", "bot_check") and attempts < self.rate_limit_attempts:
                self.sleep(pause)
                pause *= 2
                continue
            outcome = DownloadOutcome(
                video_id=video_id,
                status="failed",
                reason=reason,
                message=message,
                attempts=attempts,
            )
            atomic_write(
                self.out_dir / f"{video_id}.failed.json", outcome.model_dump_json(indent=2) + "\n"
            )
            return outcome

    def _finish(
        self,
        video_id: str,
        url: str,
        info: Mapping[str, Any],
        candidate: Candidate | None,
        attempts: int,
    ) -> DownloadOutcome:
        path = self.out_dir / f"{video_id}.mp4"
        if not path.is_file():
            produced = sorted(self.out_dir.glob(f"{video_id}.*"))
            raise InputError(
                f"yt-dlp finished {video_id} without an mp4 ({', '.join(p.name for p in produced) or 'no file'})"
            )
        if candidate is not None:
            attribution = Attribution(
                video_id=video_id,
                title=candidate.title,
                description=candidate.description,
                channel=candidate.channel,
                channel_id=candidate.channel_id,
                url=candidate.url,
                license=CC_LICENCE if candidate.license == "creativeCommon" else candidate.license,
                published_at=candidate.published_at,
                duration_seconds=candidate.duration_seconds,
                downloaded_from=url,
                downloaded_at=datetime.now(UTC).isoformat(),
            )
        else:
            upload = str(info.get("upload_date") or "")
            attribution = Attribution(
                video_id=video_id,
                title=str(info.get("title") or ""),
                description=str(info.get("description") or ""),
                channel=str(info.get("channel") or info.get("uploader") or ""),
                channel_id=str(info.get("channel_id") or ""),
                url=WATCH_URL.format(id=video_id),
                license=str(info.get("license") or "unknown (downloaded without search metadata)"),
                published_at=f"{upload[:4]}-{upload[4:6]}-{upload[6:]}" if len(upload) == 8 else "",
                duration_seconds=info.get("duration"),
                downloaded_from=url,
                downloaded_at=datetime.now(UTC).isoformat(),
            )
        atomic_write(
            self.out_dir / f"{video_id}.attribution.json",
            attribution.model_dump_json(indent=2) + "\n",
        )
        (self.out_dir / f"{video_id}.failed.json").unlink(missing_ok=True)
        return DownloadOutcome(
            video_id=video_id,
            status="downloaded",
            path=str(path),
            attempts=attempts,
            licence=attribution.license,
        )

    def download_many(
        self, video_ids: Sequence[str], candidates: Mapping[str, Candidate] | None = None
    ) -> list[DownloadOutcome]:
        """Download each id in turn; a failure is recorded and the next one goes on."""
        known = candidates or {}
        return [self.download(vid, known.get(vid)) for vid in dict.fromkeys(video_ids)]
