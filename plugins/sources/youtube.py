"""The ``youtube`` source: Creative-Commons search over YouTube Data API v3, with a quota ledger.

Search is two calls per the API's contract: ``search.list`` (100 units, top 10 per keyword,
``videoLicense=creativeCommon``) finds ids, then ``videos.list`` (1 unit per request of up to
50 ids) gives what search does not: the exact duration, the licence as YouTube holds it (the
search filter is not authoritative) and the full description.

The quota is the scarce thing: 10,000 units a day by default, and the day ends at midnight
America/Los_Angeles. Every answered request is charged to a SQLite ledger in the collection
folder, and its response is kept under a key made of the method and its parameters (never the
key), so a run stopped by an empty quota resumes the next day without paying again for what
was already answered, and a rerun replays everything from the ledger.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import sqlite3
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo

from pydantic import Field

from vkr_core.hookspecs import hookimpl
from vkr_core.log import redact, register_secrets
from vkr_core.schemas import InputError, Strict, Video, VkrError, check_video_id
from vkr_core.sources import (
    SearchKeyRefused,
    SearchQuota,
    SearchQuotaExhausted,
    SearchSource,
    video_path_in_root,
)

if TYPE_CHECKING:
    # Imported where a client is made: every `vkr` command loads this plugin, and only a
    # YouTube search needs aiohttp (~0.13 s of each start-up).
    import aiohttp

API_BASE = "https://www.googleapis.com/youtube/v3"
API_KEY_ENV = "YOUTUBE_API_KEY"
API_BASE_ENV = "YOUTUBE_API_BASE"
LEDGER_FILE = "youtube.sqlite"
# Units per request, from the API's quota table.
METHOD_COST = {"search": 100, "videos": 1}
DEFAULT_DAILY_QUOTA = 10_000
PACIFIC = ZoneInfo("America/Los_Angeles")
RESULTS_PER_KEYWORD = 10
IDS_PER_LIST_REQUEST = 50
MAX_DURATION_SECONDS = 30 * 60
CREATIVE_COMMON = "creativeCommon"
WATCH_URL = "https://www.youtube.com/watch?v={id}"

_QUOTA_REASONS = {"quotaExceeded", "dailyLimitExceeded", "dailyLimitExceededUnreg"}
_RATE_REASONS = {"rateLimitExceeded", "userRateLimitExceeded"}
_KEY_REASONS = {
    "keyInvalid",
    "keyExpired",
    "API_KEY_INVALID",
    "API_KEY_EXPIRED",
    "forbidden",
    "accessNotConfigured",
    "SERVICE_DISABLED",
    "ipRefererBlocked",
    "API_KEY_HTTP_REFERRER_BLOCKED",
    "API_KEY_IP_ADDRESS_BLOCKED",
}
_DURATION = re.compile(
    r"^P(?:(?P<days>\d+)D)?(?:T(?:(?P<hours>\d+)H)?(?:(?P<minutes>\d+)M)?(?:(?P<seconds>\d+)S)?)?$"
)
_TAG = re.compile(r"<[^>]+>")


class YouTubeError(VkrError):
    """The YouTube Data API refused or failed a request."""


class QuotaExhausted(YouTubeError, SearchQuotaExhausted):
    """The day's quota is spent: nothing more can be asked until ``resets_at``."""


class KeyRejected(YouTubeError, SearchKeyRefused):
    """The API key is invalid, expired or not allowed to use the API."""


def parse_duration(text: str) -> int:
    """Seconds in an ISO 8601 duration as YouTube writes it (``PT1H2M3S``, ``P1DT2H``, ``P0D``)."""
    match = _DURATION.match(text or "")
    if match is None or text in ("P", "PT"):
        raise ValueError(f"not an ISO 8601 duration: {text!r}")
    parts = {k: int(v) for k, v in match.groupdict(default="0").items()}
    return (
        parts["days"] * 86_400 + parts["hours"] * 3_600 + parts["minutes"] * 60 + parts["seconds"]
    )


def quota_day(now: datetime) -> date:
    """The quota day ``now`` falls in: YouTube's days run midnight to midnight Pacific time."""
    return now.astimezone(PACIFIC).date()


def quota_resets_at(now: datetime) -> datetime:
    """The next midnight Pacific after ``now`` (aware, in Pacific time)."""
    tomorrow = quota_day(now) + timedelta(days=1)
    return datetime.combine(tomorrow, time(0), tzinfo=PACIFIC)


def describe_reset(resets_at: datetime) -> str:
    """``2026-12-03 00:00 PST (09:00 CET here)``: Pacific for YouTube, local for the user."""
    local = resets_at.astimezone()
    return f"{resets_at:%Y-%m-%d %H:%M %Z} ({local:%Y-%m-%d %H:%M %Z} local time)"


def _utc_now() -> datetime:
    return datetime.now(UTC)


def request_key(method: str, params: dict[str, Any]) -> str:
    """The cache key of a request: method and sorted parameters, never the API key."""
    clean = {k: str(v) for k, v in sorted(params.items()) if k != "key"}
    return hashlib.sha256(json.dumps([method, clean], separators=(",", ":")).encode()).hexdigest()


class QuotaStatus(Strict):
    day: str
    spent: int
    limit: int
    requests: dict[str, int]
    units: dict[str, int]
    exhausted: bool
    resets_at: datetime


class Ledger:
    """What every quota ledger shares: the day, the budget check and the exhausted error.

    A request's units are reserved (``reserve``) in one transaction before it is sent, so
    concurrent requests, in one process or several sharing the ledger, never spend past the
    quota between them; ``charge`` then records the answered request (its units stay spent,
    as YouTube charges every answered request), and ``refund`` gives the units back when
    YouTube did not charge it (no answer, a quota or key refusal).
    """

    daily_quota: int
    clock: Callable[[], datetime]

    def today(self) -> date:
        return quota_day(self.clock())

    def status(self) -> QuotaStatus:
        raise NotImplementedError

    def units_by_method(self) -> dict[str, int]:
        raise NotImplementedError

    def reserve(self, method: str) -> None:
        raise NotImplementedError

    def refund(self, method: str) -> None:
        raise NotImplementedError

    def charge(self, method: str, key: str | None, params: dict[str, Any], body: Any) -> None:
        raise NotImplementedError

    def mark_exhausted(self) -> None:
        raise NotImplementedError

    def cached(self, key: str) -> dict[str, Any] | None:
        raise NotImplementedError

    def remember_videos(self, items: dict[str, Any], missing: Iterable[str]) -> None:
        raise NotImplementedError

    def try_hold(self, key: str) -> bool:
        """Take the right to send request ``key`` before anyone else sharing this ledger;
        False while another driver holds it (it will keep the response, so wait and replay
        it). Drivers in one process are kept apart by the client; a ledger that only one
        process uses has nothing more to do."""
        return True

    def let_go(self, key: str) -> None:
        """Give back what ``try_hold`` took."""

    def known_videos(self, ids: Sequence[str]) -> dict[str, dict[str, Any] | None]:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def exhausted_error(self, why: str) -> QuotaExhausted:
        status = self.status()
        resets_at = status.resets_at
        return QuotaExhausted(
            f"YouTube quota for {status.day} (Pacific) is used up ({why}; "
            f"{status.spent:,} of {status.limit:,} units spent by this collection): it resets at "
            f"{describe_reset(resets_at)}; rerun then, and answered requests are replayed, "
            "not paid again",
            resets_at,
        )

    def over_budget(self, method: str, spent: int, exhausted: bool) -> str | None:
        """Why ``method`` may not be sent with ``spent`` units spent today, or None."""
        cost = METHOD_COST[method]
        if exhausted and spent < self.daily_quota:
            return "YouTube answered quotaExceeded"
        if spent + cost > self.daily_quota:
            return (
                f"a {method}.list request costs {cost} units, "
                f"{max(0, self.daily_quota - spent):,} left"
            )
        return None

    def check_budget(self, method: str) -> None:
        """Raise QuotaExhausted when ``method`` would spend past today's quota."""
        status = self.status()
        why = self.over_budget(method, status.spent, status.exhausted)
        if why is not None:
            raise self.exhausted_error(why)


class QuotaLedger(Ledger):
    """Units spent per Pacific day and every answered response, in one SQLite file.

    A response and its charge are written in one transaction, so a run killed at any moment
    has either paid for a response and kept it, or neither.
    """

    def __init__(
        self,
        folder: str | Path,
        daily_quota: int = DEFAULT_DAILY_QUOTA,
        clock: Callable[[], datetime] = _utc_now,
    ) -> None:
        if daily_quota < 1:
            raise InputError(f"the daily YouTube quota must be at least 1 unit, not {daily_quota}")
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.path = self.folder / LEDGER_FILE
        self.daily_quota = daily_quota
        self.clock = clock
        try:
            self._db = sqlite3.connect(self.path, isolation_level=None, timeout=30)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.executescript(
                """
                CREATE TABLE IF NOT EXISTS spend (
                    day TEXT, method TEXT, requests INTEGER, units INTEGER,
                    PRIMARY KEY (day, method));
                CREATE TABLE IF NOT EXISTS exhausted (day TEXT PRIMARY KEY, at TEXT);
                CREATE TABLE IF NOT EXISTS responses (
                    request_key TEXT PRIMARY KEY, method TEXT, params TEXT, body TEXT,
                    day TEXT, received_at TEXT);
                -- videos.list items by id; item NULL: the id was asked for and not returned.
                CREATE TABLE IF NOT EXISTS videos (video_id TEXT PRIMARY KEY, item TEXT);
                """
            )
        except sqlite3.DatabaseError as exc:
            raise InputError(f"YouTube ledger {self.path} is not usable: {exc}") from None

    def close(self) -> None:
        self._db.close()

    def status(self) -> QuotaStatus:
        day = self.today().isoformat()
        rows = self._db.execute(
            "SELECT method, requests, units FROM spend WHERE day = ?", (day,)
        ).fetchall()
        exhausted = (
            self._db.execute("SELECT 1 FROM exhausted WHERE day = ?", (day,)).fetchone() is not None
        )
        spent = sum(units for _, _, units in rows)
        return QuotaStatus(
            day=day,
            spent=spent,
            limit=self.daily_quota,
            requests={m: r for m, r, _ in rows},
            units={m: u for m, _, u in rows},
            exhausted=exhausted or spent >= self.daily_quota,
            resets_at=quota_resets_at(self.clock()),
        )

    def units_by_method(self) -> dict[str, int]:
        """Units spent per method over every day of this folder."""
        rows = self._db.execute("SELECT method, SUM(units) FROM spend GROUP BY method")
        return {method: int(units) for method, units in rows}

    def reserve(self, method: str) -> None:
        """Spend ``method``'s units before its request is sent, or raise QuotaExhausted."""
        day = self.today().isoformat()
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            row = self._db.execute(
                "SELECT COALESCE(SUM(units), 0) FROM spend WHERE day = ?", (day,)
            ).fetchone()
            exhausted = (
                self._db.execute("SELECT 1 FROM exhausted WHERE day = ?", (day,)).fetchone()
                is not None
            )
            why = self.over_budget(method, int(row[0]), exhausted)
            if why is None:
                self._db.execute(
                    "INSERT INTO spend VALUES (?, ?, 0, ?) ON CONFLICT (day, method) DO UPDATE "
                    "SET units = units + excluded.units",
                    (day, method, METHOD_COST[method]),
                )
        if why is not None:
            raise self.exhausted_error(why)

    def refund(self, method: str) -> None:
        """Give back a reservation YouTube did not charge."""
        self._db.execute(
            "UPDATE spend SET units = units - ? WHERE day = ? AND method = ?",
            (METHOD_COST[method], self.today().isoformat(), method),
        )

    def mark_exhausted(self) -> None:
        self._db.execute(
            "INSERT OR IGNORE INTO exhausted VALUES (?, ?)",
            (self.today().isoformat(), self.clock().isoformat()),
        )

    def cached(self, key: str) -> dict[str, Any] | None:
        row = self._db.execute(
            "SELECT body FROM responses WHERE request_key = ?", (key,)
        ).fetchone()
        return None if row is None else json.loads(row[0])

    def charge(self, method: str, key: str | None, params: dict[str, Any], body: Any) -> None:
        """Count one answered request (its units were reserved); keep its response when it
        is one to replay."""
        day, now = self.today().isoformat(), self.clock().isoformat()
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute(
                "INSERT INTO spend VALUES (?, ?, 1, 0) ON CONFLICT (day, method) DO UPDATE "
                "SET requests = requests + 1",
                (day, method),
            )
            if key is not None:
                clean = {k: v for k, v in params.items() if k != "key"}
                self._db.execute(
                    "INSERT OR REPLACE INTO responses VALUES (?, ?, ?, ?, ?, ?)",
                    (key, method, json.dumps(clean), json.dumps(body), day, now),
                )

    def remember_videos(self, items: dict[str, Any], missing: Iterable[str]) -> None:
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.executemany(
                "INSERT OR REPLACE INTO videos VALUES (?, ?)",
                [(vid, json.dumps(item)) for vid, item in items.items()]
                + [(vid, None) for vid in missing],
            )

    def known_videos(self, ids: Sequence[str]) -> dict[str, dict[str, Any] | None]:
        """Ids videos.list already answered for: their item, or None when it left them out."""
        found: dict[str, dict[str, Any] | None] = {}
        for start in range(0, len(ids), 500):
            chunk = list(ids[start : start + 500])
            marks = ",".join("?" * len(chunk))
            for vid, item in self._db.execute(
                f"SELECT video_id, item FROM videos WHERE video_id IN ({marks})", chunk
            ):
                found[vid] = None if item is None else json.loads(item)
        return found


def open_ledger(
    folder: str | Path,
    daily_quota: int = DEFAULT_DAILY_QUOTA,
    clock: Callable[[], datetime] = _utc_now,
    state: str | None = None,
) -> Ledger:
    """The collection's ledger: the SQLite file in ``folder``, or, with a state URL, the
    database every driver of the collection shares (so together they keep to the quota)."""
    if state is None:
        return QuotaLedger(folder, daily_quota, clock)
    scheme = state.partition("://")[0].lower()
    if scheme not in ("postgresql", "postgres"):
        raise InputError(
            f"state {state}: the YouTube quota ledger can be kept in postgresql:// URLs only"
        )
    from plugins.backends.postgres_ledger import PostgresQuotaLedger

    return PostgresQuotaLedger(state, daily_quota, clock)


class Candidate(Strict):
    """A Creative-Commons video of at most the maximum length, with what attribution needs."""

    video_id: str
    title: str
    description: str
    channel: str
    channel_id: str
    duration_seconds: int
    license: str
    published_at: str
    url: str
    keywords: list[str] = Field(default_factory=list)


class Rejected(Strict):
    video_id: str
    reason: str


class SearchReport(Strict):
    """What a search found: candidates, why the others were dropped, and the quota spent."""

    keywords: dict[str, list[str]]
    candidates: list[Candidate]
    rejected: list[Rejected]
    # Ids search returned that videos.list left out (removed, made private since indexing).
    missing: list[str]
    quota: QuotaStatus


def candidate_from_item(item: dict[str, Any], max_duration: int) -> Candidate | Rejected:
    """A videos.list item as a candidate, or the reason it is not one."""
    video_id = str(item.get("id", ""))
    snippet = item.get("snippet") or {}
    licence = (item.get("status") or {}).get("license", "")
    if licence != CREATIVE_COMMON:
        return Rejected(
            video_id=video_id, reason=f"licence is {licence or 'unknown'!r}, not {CREATIVE_COMMON}"
        )
    raw = (item.get("contentDetails") or {}).get("duration", "")
    try:
        seconds = parse_duration(raw)
    except ValueError:
        return Rejected(video_id=video_id, reason=f"duration {raw!r} is not ISO 8601")
    if seconds == 0:
        return Rejected(video_id=video_id, reason="no duration (a live stream or premiere)")
    if seconds > max_duration:
        return Rejected(
            video_id=video_id,
            reason=f"{seconds // 60} min {seconds % 60} s is longer than {max_duration // 60} min",
        )
    return Candidate(
        video_id=video_id,
        title=str(snippet.get("title", "")),
        description=str(snippet.get("description", "")),
        channel=str(snippet.get("channelTitle", "")),
        channel_id=str(snippet.get("channelId", "")),
        duration_seconds=seconds,
        license=licence,
        published_at=str(snippet.get("publishedAt", "")),
        url=WATCH_URL.format(id=video_id),
    )


def _error_parts(status: int, body: Any) -> tuple[set[str], str]:
    """The reasons (``errors[].reason`` and ``details[].reason``) and message of an error reply."""
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict):
        return set(), f"HTTP {status}"
    reasons = {str(e.get("reason")) for e in error.get("errors") or [] if isinstance(e, dict)}
    reasons |= {str(d.get("reason")) for d in error.get("details") or [] if isinstance(d, dict)}
    reasons.discard("None")
    message = " ".join(_TAG.sub("", str(error.get("message", ""))).split())
    return reasons, message or f"HTTP {status}"


class YouTubeClient:
    """YouTube Data API v3 over aiohttp: search.list and videos.list, charged to a ledger.

    Use as ``async with YouTubeClient(key, ledger) as client``. ``base_url`` points it at a
    loopback server in tests.
    """

    def __init__(
        self,
        api_key: str,
        ledger: Ledger,
        base_url: str = API_BASE,
        *,
        max_attempts: int = 5,
        backoff_seconds: float = 1.0,
        max_backoff_seconds: float = 60.0,
        timeout_seconds: float = 30.0,
    ) -> None:
        if not api_key:
            raise InputError(f"no YouTube API key: set {API_KEY_ENV}")
        register_secrets([api_key])
        self._key = api_key
        self.ledger = ledger
        self.base_url = base_url.rstrip("/")
        self.max_attempts = max_attempts
        self.backoff_seconds = backoff_seconds
        self.max_backoff_seconds = max_backoff_seconds
        import aiohttp

        self._timeout = aiohttp.ClientTimeout(total=timeout_seconds)
        self._session: aiohttp.ClientSession | None = None
        # Requests being sent now, by key: the same request asked again meanwhile waits for
        # this one's response instead of paying for it a second time.
        self._sending: dict[str, asyncio.Task[dict[str, Any]]] = {}

    async def __aenter__(self) -> YouTubeClient:
        import aiohttp

        self._session = aiohttp.ClientSession(timeout=self._timeout)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _wait(self, attempt: int, retry_after: str | None) -> float:
        if retry_after and retry_after.isdigit():
            return min(float(retry_after), self.max_backoff_seconds)
        return min(self.backoff_seconds * 2**attempt, self.max_backoff_seconds)

    async def call(self, method: str, params: dict[str, Any]) -> dict[str, Any]:
        """One API call (``method`` is ``search`` or ``videos``): from the ledger when it was
        answered before, else over HTTP, charged, kept, retried on rate limits and 5xx.

        A request is sent once however many ask for it at the same time: in this process
        they wait for the first one's response; across drivers sharing the ledger, the
        first to ``try_hold`` it sends it and the others replay what it kept."""
        if self._session is None:
            raise RuntimeError("use YouTubeClient inside `async with`")
        key = request_key(method, params)
        while True:
            cached = self.ledger.cached(key)
            if cached is not None:
                return cached
            sending = self._sending.get(key)
            if sending is None:
                break
            try:
                return await asyncio.shield(sending)
            except asyncio.CancelledError:
                if not sending.cancelled():
                    raise  # this caller was cancelled
                # The sender was cancelled, not this caller: ask again.
        sending = self._sending[key] = asyncio.ensure_future(self._send_once(method, params, key))
        try:
            return await sending  # cancelling this caller cancels the request
        finally:
            del self._sending[key]

    async def _send_once(self, method: str, params: dict[str, Any], key: str) -> dict[str, Any]:
        """Send ``key`` once every other driver sharing the ledger has let go of it, unless
        one of them got its response meanwhile."""
        wait = 0.05
        while not self.ledger.try_hold(key):
            await asyncio.sleep(wait)
            wait = min(wait * 2, 1.0)
            cached = self.ledger.cached(key)
            if cached is not None:
                return cached
        try:
            cached = self.ledger.cached(key)  # answered before this driver held it
            return cached if cached is not None else await self._send(method, params, key)
        finally:
            self.ledger.let_go(key)

    async def _send(self, method: str, params: dict[str, Any], key: str) -> dict[str, Any]:
        import aiohttp

        session = self._session
        assert session is not None  # call() checked
        url = f"{self.base_url}/{method}"
        last = ""
        for attempt in range(self.max_attempts):
            self.ledger.reserve(method)
            try:
                async with session.get(url, params={**params, "key": self._key}) as reply:
                    text = await reply.text()
                    status, retry_after = reply.status, reply.headers.get("Retry-After")
            except (aiohttp.ClientError, TimeoutError) as exc:
                # Unanswered, so not charged by YouTube.
                self.ledger.refund(method)
                # aiohttp's text can carry the URL, and so the key.
                last = redact(f"{type(exc).__name__}: {exc}")
                if attempt + 1 < self.max_attempts:
                    await asyncio.sleep(self._wait(attempt, None))
                continue
            except BaseException:  # cancelled mid-request: as if never sent
                self.ledger.refund(method)
                raise
            try:
                body = json.loads(text) if text else {}
            except json.JSONDecodeError:
                body = None
            if status == 200 and isinstance(body, dict):
                self.ledger.charge(method, key, params, body)
                return body
            reasons, message = _error_parts(status, body)
            message = redact(message)
            if reasons & _QUOTA_REASONS or reasons & _KEY_REASONS or status == 401:
                # YouTube charges neither a quota nor a key refusal.
                self.ledger.refund(method)
            if reasons & _QUOTA_REASONS:
                self.ledger.mark_exhausted()
                raise self.ledger.exhausted_error(
                    f"YouTube answered {'/'.join(sorted(reasons & _QUOTA_REASONS))}"
                )
            if reasons & _KEY_REASONS or status == 401:
                why = "/".join(sorted(reasons & _KEY_REASONS)) or f"HTTP {status}"
                raise KeyRejected(
                    f"YouTube refused the API key in {API_KEY_ENV} ({why}: {message}): "
                    "check the key, and that YouTube Data API v3 is enabled for its project"
                )
            # An answered request is charged whether or not it succeeded.
            self.ledger.charge(method, None, params, None)
            detail = " ".join(["HTTP", str(status), *sorted(reasons)])
            last = (
                f"{detail}: {message}" if body is not None else f"{detail}: the reply is not JSON"
            )
            if status == 429 or reasons & _RATE_REASONS or status >= 500:
                if attempt + 1 < self.max_attempts:
                    await asyncio.sleep(self._wait(attempt, retry_after))
                continue
            raise YouTubeError(f"YouTube {method}.list failed: {last}")
        raise YouTubeError(
            f"YouTube {method}.list failed after {self.max_attempts} attempts: {last}"
        )

    async def search_keyword(
        self, keyword: str, max_results: int = RESULTS_PER_KEYWORD
    ) -> list[str]:
        """Video ids of the top ``max_results`` Creative-Commons results for ``keyword``."""
        body = await self.call(
            "search",
            {
                "part": "snippet",
                "type": "video",
                "videoLicense": CREATIVE_COMMON,
                "q": keyword,
                "maxResults": max_results,
            },
        )
        ids: list[str] = []
        for item in body.get("items") or []:
            ident = item.get("id") if isinstance(item, dict) else None
            if isinstance(ident, dict) and ident.get("kind") == "youtube#video":
                vid = ident.get("videoId")
                if isinstance(vid, str) and vid not in ids:
                    ids.append(vid)
        return ids

    async def video_details(self, ids: Sequence[str]) -> dict[str, dict[str, Any] | None]:
        """videos.list items for ``ids`` (None for an id the reply left out); ids answered
        before come from the ledger, the rest are asked for 50 at a time."""
        unique = list(dict.fromkeys(ids))
        known = self.ledger.known_videos(unique)
        unknown = sorted(set(unique) - set(known))
        for start in range(0, len(unknown), IDS_PER_LIST_REQUEST):
            batch = unknown[start : start + IDS_PER_LIST_REQUEST]
            body = await self.call(
                "videos", {"part": "contentDetails,snippet,status", "id": ",".join(batch)}
            )
            items = {
                str(item["id"]): item
                for item in body.get("items") or []
                if isinstance(item, dict) and item.get("id") in batch
            }
            missing = [vid for vid in batch if vid not in items]
            self.ledger.remember_videos(items, missing)
            known.update(items)
            known.update(dict.fromkeys(missing))
        return {vid: known[vid] for vid in unique}

    async def search(
        self,
        keywords: Sequence[str],
        max_results: int = RESULTS_PER_KEYWORD,
        max_duration_seconds: int = MAX_DURATION_SECONDS,
    ) -> SearchReport:
        """Search every keyword, then check each found video's licence and length."""
        cleaned = list(dict.fromkeys(" ".join(k.split()) for k in keywords))
        if not cleaned or "" in cleaned:
            raise InputError("give at least one non-empty search keyword")
        found: dict[str, list[str]] = {}
        for keyword in cleaned:
            found[keyword] = await self.search_keyword(keyword, max_results)
        order = list(dict.fromkeys(vid for ids in found.values() for vid in ids))
        details = await self.video_details(order)
        candidates: list[Candidate] = []
        rejected: list[Rejected] = []
        missing: list[str] = []
        for vid in order:
            item = details[vid]
            if item is None:
                missing.append(vid)
                continue
            verdict = candidate_from_item(item, max_duration_seconds)
            if isinstance(verdict, Candidate):
                verdict.keywords = [k for k, ids in found.items() if vid in ids]
                candidates.append(verdict)
            else:
                rejected.append(verdict)
        return SearchReport(
            keywords=found,
            candidates=candidates,
            rejected=rejected,
            missing=missing,
            quota=self.ledger.status(),
        )


def api_key_from_env() -> str:
    """The key from ``YOUTUBE_API_KEY``, registered as a secret; InputError when unset."""
    key = os.environ.get(API_KEY_ENV, "").strip()
    if not key:
        raise InputError(
            f"no YouTube API key: set {API_KEY_ENV} (a key from a Google Cloud project with "
            "YouTube Data API v3 enabled)"
        )
    register_secrets([key])
    return key


async def search_youtube(
    keywords: Sequence[str],
    collection_dir: str | Path,
    *,
    api_key: str | None = None,
    base_url: str | None = None,
    daily_quota: int = DEFAULT_DAILY_QUOTA,
    max_duration_seconds: int = MAX_DURATION_SECONDS,
    clock: Callable[[], datetime] = _utc_now,
    backoff_seconds: float = 1.0,
) -> SearchReport:
    """Search ``keywords`` with the ledger in ``collection_dir`` (the key from the environment
    unless given)."""
    ledger = QuotaLedger(collection_dir, daily_quota, clock)
    try:
        async with YouTubeClient(
            api_key or api_key_from_env(),
            ledger,
            base_url or os.environ.get(API_BASE_ENV) or API_BASE,
            backoff_seconds=backoff_seconds,
        ) as client:
            return await client.search(keywords, max_duration_seconds=max_duration_seconds)
    finally:
        ledger.close()


class YouTubeSource(SearchSource):
    """Videos downloaded from YouTube into a folder, with their attribution beside them.

    ``search`` and ``download`` fill the folder; ``resolve`` and ``list`` read it back as
    :class:`Video` records, title and description from the attribution file. A pipeline
    reaches search and download through the generic SearchSource contract.
    """

    name = "youtube"

    async def search(
        self, keywords: Sequence[str], collection_dir: str | Path, **options: Any
    ) -> SearchReport:
        return await search_youtube(keywords, collection_dir, **options)

    def api_key_from_env(self) -> str:
        return api_key_from_env()

    @asynccontextmanager
    async def open_search(
        self,
        folder: str | Path,
        *,
        daily_quota: int,
        clock: Callable[[], datetime],
        api_base: str | None = None,
        api_key: str,
        state: str | None = None,
    ) -> AsyncIterator[YouTubeClient]:
        ledger = open_ledger(folder, daily_quota, clock, state)
        try:
            async with YouTubeClient(api_key, ledger, api_base or API_BASE) as client:
                yield client
        finally:
            ledger.close()

    def downloader(
        self,
        folder: str | Path,
        *,
        url_template: str | None = None,
        min_interval: float = 2.0,
        **options: Any,
    ) -> Any:
        from plugins.sources.youtube_download import YouTubeDownloader

        return YouTubeDownloader(
            folder, url_template=url_template, min_interval_seconds=min_interval, **options
        )

    def quota(
        self,
        folder: str | Path,
        *,
        daily_quota: int,
        clock: Callable[[], datetime],
        state: str | None = None,
    ) -> SearchQuota:
        ledger = open_ledger(folder, daily_quota, clock, state)
        try:
            status = ledger.status()
            return SearchQuota(
                day=status.day,
                spent=status.spent,
                limit=status.limit,
                resets_at=status.resets_at,
                units_by_method=ledger.units_by_method(),
            )
        finally:
            ledger.close()

    def describe_reset(self, resets_at: datetime) -> str:
        return describe_reset(resets_at.astimezone(PACIFIC))

    def resolve(self, video_id: str, videos_dir: str | Path = ".", **options: Any) -> Video:
        from plugins.sources.youtube_download import read_attribution

        check_video_id(video_id)
        root = Path(videos_dir)
        path = root / f"{video_id}.mp4"
        if not path.is_file():
            raise InputError(f"YouTube video {video_id!r} is not downloaded in {root}")
        attribution = read_attribution(root, video_id)
        fields = {k: v for k, v in options.items() if v is not None}
        return Video(
            video_id=video_id,
            path=str(path.resolve()),
            video_path=video_path_in_root(path, root),
            title=fields.pop("title", attribution.title if attribution else ""),
            description=fields.pop("description", attribution.description if attribution else ""),
            **fields,
        )

    def list(self, videos_dir: str | Path = ".", **options: Any) -> list[Video]:
        root = Path(videos_dir)
        return [self.resolve(p.stem, root, **options) for p in sorted(root.glob("*.mp4"))]


@hookimpl
def vkr_register_sources(register: Any) -> None:
    register(YouTubeSource())
