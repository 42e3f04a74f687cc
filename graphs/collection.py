"""The collection pipeline (DESIGN.md stages 2-8): knowledge points -> a manifest of kept videos.

One item is one knowledge point of a built bank. Per point: ``scenario_generation``, then
``search_keywords`` per scenario, then a Creative-Commons YouTube search (at most 30 min)
per scenario; every candidate goes through ``metadata_relevance``, download, frame sampling,
``visual_relevance`` and image moderation. Every model call goes through the engine
(routing, cache, journal, call records), every YouTube request through the quota ledger,
every download through yt-dlp's archive: a run killed at any moment and started again pays
for nothing twice.

A video is judged, downloaded and moderated once, however many keywords or points find it:
its outcome is kept in ``DIR/state/<video_id>.json`` (and, while it is being worked on, one
in-process future that every point finding it waits on; with a shared state, a claim in the
run's item status that other drivers wait on). It is judged against the first
point (and scenario) that found it, and linked to every point that did (``DIR/links.jsonl``).

The collection folder ``DIR`` holds ``manifest.jsonl`` (what ``vkr run`` reads), the videos
with their attribution (``videos/``), the per-video state, ``links.jsonl``,
``collect_report.json`` (the funnel), the quota ledger and the engine's run directory
(``run/``: records per point, call log, cache).
"""

from __future__ import annotations

import asyncio
import json
import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError

from knowledge.schemas import KnowledgePoint, ScenarioInput
from vkr_core.config import RunConfig
from vkr_core.context import RunContext, StepContext
from vkr_core.errors import describe_validation_error
from vkr_core.files import atomic_write, read_jsonl
from vkr_core.hookspecs import hookimpl
from vkr_core.log import get_logger
from vkr_core.moderation import ImageModeration, find_image_moderator
from vkr_core.pipelines import Items, Pipeline, PipelineRun
from vkr_core.schemas import InputError, Strict, Video, VkrError
from vkr_core.sources import SearchKeyRefused, SearchQuotaExhausted, SearchSource
from vkr_core.steps import ReplyError
from vkr_core.store import RunLayout, log_problem

log = get_logger("vkr.collect")

PIPELINE = "collection"
SCENARIO_STEP = "scenario_generation"
KEYWORDS_STEP = "search_keywords"
METADATA_STEP = "metadata_relevance"
VISUAL_STEP = "visual_relevance"
MODEL_STEPS = [SCENARIO_STEP, KEYWORDS_STEP, METADATA_STEP, VISUAL_STEP]
MODERATION_STEP = "moderation"
# The moderator a moderation section without "provider" uses (a provider's name).
DEFAULT_MODERATOR = "azure-content-safety"

MANIFEST_FILE = "manifest.jsonl"
LINKS_FILE = "links.jsonl"
REPORT_FILE = "collect_report.json"
# Written when the quota stops a run; the next run starts by removing it.
STOP_FILE = "quota_stop.json"
VIDEOS_DIR = "videos"
STATE_DIR = "state"
RUN_DIR = "run"
# A video's claim in the run's item status, beside the points' (whose ids never have it).
VIDEO_CLAIM = "video:"
# Seconds between looks at a video another driver is working out.
CLAIM_POLL = 0.5
# For tests only: the wall clock the quota ledger reads (ISO 8601), so a test can move to
# the next Pacific day without waiting for it.
NOW_ENV = "VKR_COLLECT_NOW"

RUN_BY_COLLECT = (
    "the collection pipeline runs through `vkr collect --bank BANK --pool POOL --out DIR`: "
    "it builds the bank's knowledge points and writes a manifest"
)

FUNNEL_STAGES = (
    ("points", "knowledge points"),
    ("scenarios", "scenarios"),
    ("keywords", "search keywords"),
    ("candidates", "candidates found"),
    ("cc_short", "CC and <= 30 min"),
    ("metadata_pass", "metadata relevant"),
    ("downloaded", "downloaded"),
    ("visual_pass", "visually relevant"),
    ("safe", "safe (kept)"),
)


class CollectConfig(RunConfig):
    """A collection run's config: the engine's settings and the collection's own.

    Endpoints, keys and the clock are excluded from the snapshot: they change where requests
    go, not what the answers are, so a rerun against another port still resumes.
    """

    pipeline: str = PIPELINE
    collection_dir: str = Field(default="", exclude=True)
    # The registered search source (vkr_core.sources.SearchSource) videos come from.
    source: str = "youtube"
    youtube_api_base: str = Field(default="", exclude=True)
    download_url_template: str | None = Field(default=None, exclude=True)
    daily_quota: int = Field(default=10_000, ge=1, exclude=True)
    download_interval: float = Field(default=2.0, ge=0, exclude=True)
    now: str | None = Field(default=None, exclude=True)
    max_duration_seconds: int = Field(default=30 * 60, ge=1)
    results_per_keyword: int = Field(default=10, ge=1, le=50)
    # Frames sampled per downloaded video: the visual judge sees up to 8 of them spread over
    # the video, moderation 4 at random.
    frame_fps: float = Field(default=4.0, gt=0)
    frame_max: int = Field(default=16, ge=1, le=64)
    # None: no image moderation (every visually relevant video is kept).
    moderation: dict[str, Any] | None = None


def _config(config: Any) -> CollectConfig:
    if not isinstance(config, CollectConfig) or not config.collection_dir:
        raise InputError(RUN_BY_COLLECT)
    return config


def clock_from(now: str | None) -> Callable[[], datetime]:
    """The ledger's clock: the real one, or one that starts at ``now`` (tests)."""
    if not now:
        return lambda: datetime.now(UTC)
    try:
        start = datetime.fromisoformat(now)
    except ValueError:
        raise InputError(f"{NOW_ENV}={now!r} is not an ISO 8601 time") from None
    if start.tzinfo is None:
        start = start.replace(tzinfo=UTC)
    offset = start - datetime.now(UTC)
    return lambda: datetime.now(UTC) + offset


# ---------------------------------------------------------------- records


class ScenarioSearch(Strict):
    """One scenario of a point: its keywords and what searching them found."""

    scenario: str
    keywords: list[str] = Field(default_factory=list)
    found: list[str] = Field(default_factory=list)
    candidates: list[str] = Field(default_factory=list)
    rejected: dict[str, str] = Field(default_factory=dict)
    missing: list[str] = Field(default_factory=list)


class PointRecord(Strict):
    """What collecting for one knowledge point produced, in ``run/records/<point_id>.json``."""

    item_id: str
    status: Literal["done", "failed", "unfinished"]
    failure: str | None = None
    point: KnowledgePoint
    scenarios: list[ScenarioSearch] = Field(default_factory=list)
    # The candidates (CC, short enough) this point found, and those of them kept.
    videos: list[str] = Field(default_factory=list)
    kept: list[str] = Field(default_factory=list)
    accepted: int = 0


VideoStatus = Literal[
    "kept", "metadata_rejected", "download_failed", "unreadable", "visual_rejected", "unsafe"
]


class VideoState(Strict):
    """One video's way through the judges, download and moderation (``state/<id>.json``)."""

    video_id: str
    status: VideoStatus
    reason: str = ""
    # The point and scenario it was judged against: the first that found it.
    point_id: str
    scenario: str
    title: str = ""
    description: str = ""
    channel: str = ""
    channel_id: str = ""
    url: str = ""
    license: str = ""
    # The licence as the attribution beside the download words it (for the manifest).
    licence: str = ""
    published_at: str = ""
    duration_seconds: int = 0
    metadata: dict[str, Any] | None = None
    downloaded: bool = False
    path: str | None = None
    download_failure: str | None = None
    frames: int = 0
    visual: dict[str, Any] | None = None
    moderation: dict[str, Any] | None = None


def state_path(collection_dir: str | Path, video_id: str) -> Path:
    return Path(collection_dir) / STATE_DIR / f"{video_id}.json"


def read_state(collection_dir: str | Path, video_id: str) -> VideoState | None:
    path = state_path(collection_dir, video_id)
    if not path.is_file():
        return None
    try:
        return VideoState.model_validate_json(path.read_bytes())
    except ValidationError as exc:
        # A damaged state is worked out again: every step of it replays from a cache.
        log.warning("video state unreadable", path=str(path), error=describe_validation_error(exc))
        return None


# ---------------------------------------------------------------- the run


class QuotaStop(VkrError):
    """The YouTube quota ran out: the run stops, and a rerun after the reset goes on."""

    def __init__(self, message: str, resets_at: datetime) -> None:
        super().__init__(message)
        self.resets_at = resets_at


class KeyRefused(VkrError):
    """YouTube refused the API key: no point can be searched until it is fixed."""


def shared_quota(state: str | None) -> dict[str, Any]:
    """The source's quota ledger lives where the run's state does: with a state URL, in that
    database, so every driver of the collection keeps to one daily quota. A source that
    keeps no shared ledger is not asked to."""
    return {"state": state} if state else {}


def search_source(registry: Any, name: str) -> SearchSource:
    """The registered source ``name``, if it can search and download."""
    source = registry.get("source", name)
    if not isinstance(source, SearchSource):
        raise InputError(f"source {name!r} cannot search and download videos")
    return source


class CollectionRun(PipelineRun):
    """One collection: the source's search (and its quota), the downloader and the
    moderator are opened once and shared by every point."""

    def __init__(self, context: RunContext, config: CollectConfig):
        self.context = context
        self.config = config
        self.dir = Path(config.collection_dir)
        self.registry = context.registry
        self.source = search_source(self.registry, config.source)
        self.downloader = self.source.downloader(
            self.dir / VIDEOS_DIR,
            url_template=config.download_url_template,
            min_interval=config.download_interval,
        )
        self._search: Any = None
        self.client: Any = None
        self.moderation: ImageModeration | None = None
        # yt-dlp is synchronous and the downloader spaces its requests: one at a time.
        self._download_lock = asyncio.Lock()
        self._videos: dict[str, asyncio.Future[VideoState]] = {}
        self.stopped: QuotaStop | KeyRefused | None = None

    async def open(self, api_key: str) -> None:
        self._search = self.source.open_search(
            self.dir,
            daily_quota=self.config.daily_quota,
            clock=clock_from(self.config.now),
            api_base=self.config.youtube_api_base or None,
            api_key=api_key,
            **shared_quota(self.config.state),
        )
        self.client = await self._search.__aenter__()
        settings = self.config.moderation
        if settings is not None:
            moderator = find_image_moderator(
                self.registry, str(settings.get("provider") or DEFAULT_MODERATOR)
            )
            self.moderation = moderator.image_moderation(
                settings,
                # The run's call cache: a rerun sends no image twice.
                self.context.caller.cache,
                self.context.store.append_call,
            )

    async def close(self) -> None:
        for pending in self._videos.values():
            pending.cancel()
        if self._search is not None:
            search, self._search = self._search, None
            await search.__aexit__(None, None, None)
        if self.moderation is not None:
            await self.moderation.aclose()

    # ------------------------------------------------------------ one point

    async def process(self, item: KnowledgePoint) -> PointRecord:
        store = self.context.store
        if self.stopped is not None:
            return PointRecord(item_id=item.point_id, status="unfinished", point=item)
        done = store.layout.record(item.point_id)
        if done.is_file():
            try:
                record = PointRecord.model_validate_json(done.read_bytes())
            except ValidationError:
                record = None
            if record is not None and record.status == "done" and record.point == item:
                return record
        try:
            record = await self._collect(item)
        except KeyRefused as exc:
            # Every other point would be refused the same way: stop, and say why once.
            if self.stopped is None:
                self.stopped = exc
                stop = {"kind": "key", "reason": str(exc)}
                atomic_write(self.dir / STOP_FILE, json.dumps(stop) + "\n")
            return PointRecord(item_id=item.point_id, status="unfinished", point=item)
        except QuotaStop as exc:
            # Not written: the point is worked again (from the caches) by the rerun.
            if self.stopped is None:
                self.stopped = exc
                stop = {
                    "kind": "quota",
                    "reason": str(exc),
                    "resets_at": exc.resets_at.isoformat(),
                    "resets": self.source.describe_reset(exc.resets_at),
                }
                atomic_write(self.dir / STOP_FILE, json.dumps(stop) + "\n")
            return PointRecord(item_id=item.point_id, status="unfinished", point=item)
        store.write_record(record)
        return record

    async def _collect(self, point: KnowledgePoint) -> PointRecord:
        ctx = StepContext(self.context, item_id=point.point_id)
        meta = {"discipline": point.discipline, "subject": point.subject, "term": point.term}
        try:
            scenarios = await ctx.run(self.registry.get("step", SCENARIO_STEP), point, meta=meta)
        except ReplyError as exc:
            return self._failed(point, f"{SCENARIO_STEP}: {exc.kind} reply: {exc.reason}")
        keyword_step = self.registry.get("step", KEYWORDS_STEP)
        searches: list[ScenarioSearch] = []
        for number, scenario in enumerate(scenarios.scenarios):
            try:
                keywords = await ctx.run(
                    keyword_step, ScenarioInput(point=point, scenario=scenario), number, meta=meta
                )
            except ReplyError as exc:
                return self._failed(point, f"{KEYWORDS_STEP}: {exc.kind} reply: {exc.reason}")
            searches.append(ScenarioSearch(scenario=scenario, keywords=keywords.keywords))
        videos: dict[str, Any] = {}
        for search in searches:
            try:
                report = await self.client.search(
                    search.keywords,
                    max_results=self.config.results_per_keyword,
                    max_duration_seconds=self.config.max_duration_seconds,
                )
            except SearchQuotaExhausted as exc:
                raise QuotaStop(str(exc), exc.resets_at) from None
            except SearchKeyRefused as exc:
                raise KeyRefused(str(exc)) from None
            search.found = list(dict.fromkeys(v for ids in report.keywords.values() for v in ids))
            search.candidates = [c.video_id for c in report.candidates]
            search.rejected = {r.video_id: r.reason for r in report.rejected}
            search.missing = list(report.missing)
            for candidate in report.candidates:
                videos.setdefault(candidate.video_id, (candidate, search.scenario))
        # Each video once, in the order the point found them, the first scenario to find
        # it being the one it is judged against.
        states = [
            await self.video(candidate, point, scenario) for candidate, scenario in videos.values()
        ]
        kept = [s.video_id for s in states if s.status == "kept"]
        return PointRecord(
            item_id=point.point_id,
            status="done",
            point=point,
            scenarios=searches,
            videos=list(videos),
            kept=kept,
            accepted=len(kept),
        )

    def _failed(self, point: KnowledgePoint, reason: str) -> PointRecord:
        return PointRecord(item_id=point.point_id, status="failed", failure=reason, point=point)

    # ------------------------------------------------------------ one video

    async def video(self, candidate: Any, point: KnowledgePoint, scenario: str) -> VideoState:
        """The video's outcome: from its state file, from the work another point started,
        or worked out now against this point."""
        pending = self._videos.get(candidate.video_id)
        if pending is None:
            pending = asyncio.ensure_future(self._video(candidate, point, scenario))
            self._videos[candidate.video_id] = pending
        try:
            return await asyncio.shield(pending)
        except Exception:
            # A failure is this invocation's: the next point (or the rerun) tries again.
            if self._videos.get(candidate.video_id) is pending:
                del self._videos[candidate.video_id]
            raise

    async def _video(self, candidate: Any, point: KnowledgePoint, scenario: str) -> VideoState:
        known = read_state(self.dir, candidate.video_id)
        if known is not None:
            return known
        status = self.context.status
        if status is None:
            return await self._work_out(candidate, point, scenario)
        # Drivers sharing the run's state judge a video once too: the first to claim it
        # works it out, the others wait for its state file (on the shared folder). A claim
        # whose driver died runs out with its lease and is taken over.
        claim_id = VIDEO_CLAIM + candidate.video_id
        while True:
            claim = await status.claim(claim_id)
            if claim == "claimed":
                break
            known = read_state(self.dir, candidate.video_id)
            if known is not None:
                return known
            if claim == "done":  # its state file was lost since: worked out again, from caches
                return await self._work_out(candidate, point, scenario)
            await asyncio.sleep(min(CLAIM_POLL, status.retry_after))
        try:
            state = await self._work_out(candidate, point, scenario)
        except BaseException:
            await status.release(claim_id)
            raise
        await status.finish(claim_id, "done")
        return state

    async def _work_out(self, candidate: Any, point: KnowledgePoint, scenario: str) -> VideoState:
        known = read_state(self.dir, candidate.video_id)
        if known is not None:  # another driver finished it while this one claimed it
            return known
        state = VideoState(
            video_id=candidate.video_id,
            status="metadata_rejected",
            point_id=point.point_id,
            scenario=scenario,
            title=candidate.title,
            description=candidate.description,
            channel=candidate.channel,
            channel_id=candidate.channel_id,
            url=candidate.url,
            license=candidate.license,
            published_at=candidate.published_at,
            duration_seconds=candidate.duration_seconds,
        )
        knowledge = {"term": point.term, "definition": point.definition, "scenario": scenario}
        ctx = StepContext(self.context, item_id=candidate.video_id)
        decision = await self.registry.get("step", METADATA_STEP).judge(
            ctx,
            candidate={
                "video_id": candidate.video_id,
                "title": candidate.title,
                "description": candidate.description,
                "duration_s": candidate.duration_seconds,
                "channel": candidate.channel,
                "url": candidate.url,
            },
            knowledge=knowledge,
        )
        state.metadata = decision.model_dump(mode="json")
        if not decision.relevant:
            state.reason = decision.reason
            return self._save(state)
        async with self._download_lock:
            outcome = await asyncio.to_thread(
                self.downloader.download, candidate.video_id, candidate
            )
        if outcome.status == "failed" and outcome.reason in ("rate_limited", "bot_check"):
            # YouTube pushing back says nothing about the video: the point fails for now
            # and the rerun tries the download again.
            raise VkrError(
                f"download of {candidate.video_id} paused by YouTube ({outcome.reason}): "
                "rerun later"
            )
        if outcome.status == "failed" or outcome.path is None:
            state.status = "download_failed"
            state.download_failure = outcome.reason or "error"
            state.reason = f"{outcome.reason}: {outcome.message}".strip(": ")
            return self._save(state)
        state.downloaded = True
        state.path = outcome.path
        state.licence = outcome.licence or ""
        try:
            frames = await self._frames(candidate.video_id, Path(outcome.path))
        except VkrError as exc:
            state.status = "unreadable"
            state.reason = str(exc)
            return self._save(state)
        state.frames = len(frames)
        video = Video(
            video_id=candidate.video_id,
            path=outcome.path,
            discipline=point.discipline,
            subject=point.subject,
            title=candidate.title,
            description=candidate.description,
        )
        visual = await self.registry.get("step", VISUAL_STEP).judge(
            StepContext(self.context, video, frames), knowledge=knowledge
        )
        state.visual = visual.model_dump(mode="json")
        if not visual.relevant:
            state.status = "visual_rejected"
            state.reason = visual.reason
            return self._save(state)
        if self.moderation is not None:
            record = await self.moderation.moderate_video(
                candidate.video_id, frames, seed=self.config.seed
            )
            self.moderation.write_record(self.context.store.root, record)
            state.moderation = {"safe": record.safe, "reason": record.reason}
            if not record.safe:
                state.status = "unsafe"
                state.reason = record.reason
                return self._save(state)
        state.status = "kept"
        state.reason = ""
        return self._save(state)

    async def _frames(self, video_id: str, path: Path) -> list[Any]:
        from vkr_core.video import sample_frames

        frames_dir = self.context.store.layout.frames_root / video_id
        return await asyncio.to_thread(
            sample_frames,
            path,
            frames_dir,
            fps=self.config.frame_fps,
            max_frames=self.config.frame_max,
            pm=self.context.pm,
        )

    def _save(self, state: VideoState) -> VideoState:
        atomic_write(state_path(self.dir, state.video_id), state.model_dump_json(indent=2) + "\n")
        return state


# ---------------------------------------------------------------- the outputs


def manifest_line(
    state: VideoState, point: KnowledgePoint, platform: str = "youtube"
) -> dict[str, Any]:
    """A manifest line for a kept video: what `vkr run` reads, attribution included."""
    video = Video(
        video_id=state.video_id,
        path=f"{VIDEOS_DIR}/{state.video_id}.mp4",
        discipline=point.discipline,
        subject=point.subject,
        knowledge_point={"term": point.term, "definition": point.definition},  # type: ignore[arg-type]
        title=state.title,
        description=state.description,
        source={
            "url": state.url,
            "license": state.licence or state.license,
            "channel": state.channel,
            "channel_id": state.channel_id,
            "published_at": state.published_at,
            "platform": platform,
        },
    )
    return video.model_dump(mode="json", exclude={"video_path", "truncated"}, exclude_none=True)


def read_records(collection_dir: Path, points: list[KnowledgePoint]) -> list[PointRecord]:
    layout = RunLayout(collection_dir / RUN_DIR)
    records = []
    for point in points:
        path = layout.record(point.point_id)
        if not path.is_file():
            continue
        try:
            record = PointRecord.model_validate_json(path.read_bytes())
        except ValidationError:
            continue
        if record.point == point:
            records.append(record)
    return records


def finish(
    collection_dir: str | Path,
    points: list[KnowledgePoint],
    *,
    daily_quota: int = 10_000,
    now: str | None = None,
    units_before: int | None = None,
    stopped: dict[str, Any] | None = None,
    source: SearchSource | None = None,
    state_url: str | None = None,
) -> dict[str, Any]:
    """Write ``links.jsonl``, ``manifest.jsonl`` and ``collect_report.json`` from what the
    runs recorded (the point records and the video states); return the report.

    ``source`` is the search source the videos came from (the loaded ``youtube`` one unless
    given): its quota goes into the report."""
    if source is None:
        from vkr_core.plugins import get_plugin_manager

        source = search_source(get_plugin_manager().registry, CollectConfig().source)
    root = Path(collection_dir)
    records = read_records(root, points)
    by_id = {p.point_id: p for p in points}
    states: dict[str, VideoState] = {}
    links: list[dict[str, Any]] = []
    found: set[str] = set()
    short: set[str] = set()
    for record in records:
        for search in record.scenarios:
            found.update(search.found)
            short.update(search.candidates)
        for vid in record.videos:
            state = states.get(vid) or read_state(root, vid)
            if state is None:
                continue
            states[vid] = state
            links.append(
                {
                    "video_id": vid,
                    "point_id": record.point.point_id,
                    "term": record.point.term,
                    "judged_against": state.point_id == record.point.point_id,
                    "status": state.status,
                }
            )
    dropped_ids: dict[str, str] = {}
    for record in records:
        for search in record.scenarios:
            for vid, why in search.rejected.items():
                dropped_ids[vid] = _reason_kind(why)
            for vid in search.missing:
                dropped_ids[vid] = "missing from videos.list"
    why_dropped = Counter(dropped_ids.values())
    for state in states.values():
        if state.status != "kept":
            why_dropped[state.status.replace("_", " ")] += 1
    kept = sorted((s for s in states.values() if s.status == "kept"), key=lambda s: s.video_id)
    manifest = "".join(
        json.dumps(manifest_line(s, by_id[s.point_id], source.name), ensure_ascii=False) + "\n"
        for s in kept
        if s.point_id in by_id
    )
    atomic_write(root / MANIFEST_FILE, manifest)
    atomic_write(root / LINKS_FILE, "".join(json.dumps(link) + "\n" for link in links))
    funnel = {
        "points": len(points),
        "scenarios": sum(len(r.scenarios) for r in records),
        "keywords": sum(len(s.keywords) for r in records for s in r.scenarios),
        "candidates": len(found),
        "cc_short": len(short),
        "metadata_pass": sum(
            1 for s in states.values() if s.metadata and s.metadata.get("relevant")
        ),
        "downloaded": sum(1 for s in states.values() if s.downloaded),
        "visual_pass": sum(1 for s in states.values() if s.visual and s.visual.get("relevant")),
        "safe": len(kept),
    }
    spend = 0.0
    paid = cached = moderation_requests = moderation_cached = 0
    for run_dir in (root / RUN_DIR, root / "bank"):
        for _, call in read_jsonl(
            RunLayout(run_dir).calls, on_problem=log_problem, missing_ok=True
        ):
            if call.get("step") == MODERATION_STEP:
                if call.get("cache_hit"):
                    moderation_cached += 1
                elif call.get("outcome") == "ok":
                    moderation_requests += 1
            elif call.get("cache_hit"):
                cached += 1
            elif call.get("outcome") != "error":
                paid += 1
                spend += float(call.get("cost_usd") or 0.0)
    quota = source.quota(
        root, daily_quota=daily_quota, clock=clock_from(now), **shared_quota(state_url)
    )
    units = quota.units_by_method
    report: dict[str, Any] = {
        "funnel": funnel,
        "points_done": sum(1 for r in records if r.status == "done"),
        "points_failed": sum(1 for r in records if r.status == "failed"),
        "dropped": dict(sorted(why_dropped.items())),
        "quota": {
            "units_total": int(sum(units.values())),
            "units_by_method": {k: int(v) for k, v in sorted(units.items())},
            "units_this_run": None if units_before is None else quota.spent - units_before,
            "day": quota.day,
            "spent_today": quota.spent,
            "limit": quota.limit,
            "resets_at": quota.resets_at.isoformat(),
        },
        "model_calls": {"paid": paid, "cached": cached},
        "spend_usd": round(spend, 6),
        "moderation_requests": moderation_requests,
        "moderation_cached": moderation_cached,
        "kept": len(kept),
        "cost_per_kept_usd": round(spend / len(kept), 6) if kept else None,
        "stopped": stopped,
        "manifest": str(root / MANIFEST_FILE),
    }
    atomic_write(root / REPORT_FILE, json.dumps(report, indent=2) + "\n")
    return report


def _reason_kind(reason: str) -> str:
    """A search rejection's reason as a funnel row: licence, length or other."""
    if reason.startswith("licence"):
        return "not Creative Commons"
    if "longer than" in reason:
        return "too long"
    if "live stream" in reason:
        return "no duration"
    return "other"


def read_report(collection_dir: Path) -> dict[str, Any] | None:
    path = collection_dir / REPORT_FILE
    if not path.is_file():
        return None
    data = json.loads(path.read_text(encoding="utf-8"))
    return data if isinstance(data, dict) else None


def format_report(report: dict[str, Any]) -> str:
    """The funnel and the costs, as `vkr collect` prints them."""
    funnel = report["funnel"]
    lines = ["collection funnel:"]
    previous: int | None = None
    for key, label in FUNNEL_STAGES:
        value = funnel[key]
        share = (
            f"  ({value / previous:.0%})"
            if previous and key not in ("scenarios", "keywords", "candidates")
            else ""
        )
        lines.append(f"  {label:<20} {value:>6}{share}")
        previous = value
    if report["dropped"]:
        lines.append("dropped: " + ", ".join(f"{why} {n}" for why, n in report["dropped"].items()))
    quota = report["quota"]
    this_run = quota["units_this_run"]
    lines.append(
        f"YouTube quota: {quota['units_total']:,} units in all"
        + (f", {this_run:,} this run" if this_run is not None else "")
        + f"; {quota['spent_today']:,} of {quota['limit']:,} spent on {quota['day']} (Pacific)"
    )
    calls = report["model_calls"]
    cost = report["cost_per_kept_usd"]
    lines.append(
        f"model calls paid {calls['paid']}, cached {calls['cached']} | ${report['spend_usd']:.4f}"
        f" | moderation requests {report['moderation_requests']} | kept {report['kept']}"
        + (f" | ${cost:.4f} per kept video" if cost is not None else "")
    )
    return "\n".join(lines)


# ---------------------------------------------------------------- the pipeline


class CollectionPipeline(Pipeline):
    """Knowledge points -> scenarios -> keywords -> YouTube -> judges -> download ->
    moderation -> a manifest ``vkr run`` consumes (the paper's section 3.1)."""

    name = PIPELINE
    description = "knowledge points -> CC YouTube videos judged, downloaded and moderated"
    noun = "knowledge point"
    item_schema = KnowledgePoint
    id_field = "point_id"

    def model_steps(self, registry: Any) -> list[str]:
        return list(MODEL_STEPS)

    def check(self, run: Any) -> None:
        config = _config(run.config)
        search_source(run.registry, config.source)
        settings = config.moderation
        if settings is not None:
            moderator = find_image_moderator(
                run.registry, str(settings.get("provider") or DEFAULT_MODERATOR)
            )
            # Bad thresholds, a missing key or endpoint stop here, before anything is paid for.
            moderator.check_moderation(settings)

    def read_items(self, path: str | Path, config: Any) -> Items:
        raise InputError(RUN_BY_COLLECT)

    async def open(self, context: RunContext, checkpointer: Any) -> CollectionRun:
        config = _config(context.config)
        run = CollectionRun(context, config)
        try:
            await run.open(run.source.api_key_from_env())
        except BaseException:
            await run.close()
            raise
        return run

    def failed(self, item: Any, reason: str) -> PointRecord:
        return PointRecord(item_id=item.point_id, status="failed", failure=reason, point=item)

    def summary(self, run_dir: Path, counters: Any) -> str:
        report = read_report(Path(run_dir).parent)
        return format_report(report) if report else ""


@hookimpl
def vkr_register_pipelines(register: Any) -> None:
    register(CollectionPipeline())


# ---------------------------------------------------------------- vkr collect


@dataclass
class CollectResult:
    report: dict[str, Any]
    counters: Any
    # Set when the YouTube quota stopped the run: {"reason", "resets_at"}.
    stopped: dict[str, Any] | None
    bank_failures: int = 0


def load_points(
    bank: str | Path,
    pool: str | Path | None,
    out: Path,
    *,
    concurrency: int = 4,
    progress: bool = False,
    pm: Any = None,
) -> tuple[list[KnowledgePoint], int]:
    """The knowledge points to collect for: a built bank folder's, or a bank file's, built
    here into ``out/bank`` (a rerun pays for nothing built). Returns (points, lectures not
    built)."""
    from knowledge.built import build_bank, load_built_bank

    source = Path(bank)
    if source.is_dir():
        built = load_built_bank(source)
        return built.points(), sum(1 for b in built.lectures if b.status != "done")
    if pool is None:
        raise InputError("building a bank needs a model pool")
    result = build_bank(
        source, pool, out / "bank", concurrency=concurrency, progress=progress, pm=pm
    )
    return result.bank.points(), len(result.failed)


def collect(
    bank: str | Path,
    pool: str | Path,
    out: str | Path,
    *,
    youtube_api_base: str | None = None,
    download_url_template: str | None = None,
    daily_quota: int = 10_000,
    moderation: dict[str, Any] | None = None,
    concurrency: int = 4,
    max_spend: float | None = None,
    download_interval: float = 2.0,
    progress: bool = False,
    pm: Any = None,
    now: str | None = None,
    force: bool = False,
    source: str | None = None,
    state: str | None = None,
    executor: str = "local",
    executor_options: dict[str, Any] | None = None,
) -> CollectResult:
    """`vkr collect`: bank -> knowledge points -> ... -> ``out/manifest.jsonl``.

    ``now`` (ISO 8601) sets the quota ledger's clock, for tests. ``source`` names the
    registered search source (``youtube`` unless given). ``state`` (a URL such as
    ``postgresql://...``) keeps the run's state and the quota ledger in that database,
    shared by every driver of the collection. ``executor`` (``ray`` with its
    ``executor_options``) runs the points on another engine's workers; any but the local one
    needs ``state``, where the workers claim the videos they share. Stops cleanly when the
    YouTube quota runs out (``result.stopped``); the next run goes on from where it stopped.
    """
    from vkr_core.backends import state_backend
    from vkr_core.plugins import get_plugin_manager
    from vkr_core.run import run_items

    pm = pm or get_plugin_manager()
    source_name = source or CollectConfig().source
    search_from = search_source(pm.registry, source_name)
    clock_from(now)  # a bad clock stops here
    # The password leaves the URL here (the config keeps it in this process only); a missing
    # extra, a wrong password or a server that does not answer stops before anything is
    # written.
    public_state = CollectConfig(state=state).state
    if executor != "local" and public_state is None:
        raise InputError(
            f"collecting on the {executor} engine needs a shared state (postgresql://...): "
            "its workers claim each video there so that one of them judges and downloads it"
        )
    if public_state is not None:
        state_backend(pm.registry, "status", public_state).check(CollectConfig(state=state))
    root = Path(out).resolve()
    root.mkdir(parents=True, exist_ok=True)
    points, bank_failures = load_points(
        bank, pool, root, concurrency=concurrency, progress=progress, pm=pm
    )
    if not points:
        raise InputError(f"{bank}: the bank has no knowledge points to collect for")
    (root / STOP_FILE).unlink(missing_ok=True)
    before = search_from.quota(
        root, daily_quota=daily_quota, clock=clock_from(now), **shared_quota(public_state)
    ).spent
    config = CollectConfig(
        collection_dir=str(root),
        source=source_name,
        youtube_api_base=youtube_api_base or os.environ.get("YOUTUBE_API_BASE") or "",
        download_url_template=download_url_template,
        daily_quota=daily_quota,
        download_interval=download_interval,
        now=now,
        moderation=moderation,
        max_spend=max_spend,
        state=public_state,
        executor=executor,
        executor_options=executor_options or {},
    )
    counters = asyncio.run(
        run_items(
            points,
            root / RUN_DIR,
            pool,
            config,
            pm,
            force,
            concurrency=concurrency,
            progress=progress,
        )
    )
    stop_file = root / STOP_FILE
    stopped = json.loads(stop_file.read_text(encoding="utf-8")) if stop_file.is_file() else None
    report = finish(
        root,
        points,
        daily_quota=daily_quota,
        now=now,
        units_before=before,
        stopped=stopped,
        source=search_from,
        state_url=public_state,
    )
    if stopped is not None and stopped.get("kind") == "key":
        raise InputError(stopped["reason"])
    return CollectResult(report, counters, stopped, bank_failures)
