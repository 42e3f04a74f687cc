"""Opening a run: config snapshot, router check, caller, checkpointer and graph, in that order.

Everything that can be wrong with the inputs is found here, before any call is paid for.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vkr_core.calls import CallFailed, ModelCaller
from vkr_core.config import (
    EligibilityRegistry,
    Pool,
    RunConfig,
    load_pool,
    load_registry,
)
from vkr_core.context import RunContext
from vkr_core.log import get_logger, register_secrets
from vkr_core.plugins import VkrPluginManager, get_plugin_manager
from vkr_core.router import Router
from vkr_core.schemas import CallRecord, InputError, Video, VideoRecord, VkrError
from vkr_core.seeds import SeedBank
from vkr_core.store import DiskFull, RunStore, is_disk_full

if TYPE_CHECKING:
    from corpus.report import FunnelCounts
    from vkr_core.batch import BatchCounters

log = get_logger("vkr.run")
# SQLite pages of the call cache a run keeps in memory (4 KB each): SQLite's own default.
CALL_CACHE_PAGES = 500


def model_steps(registry: Any) -> list[str]:
    """Names of the steps that call models and run in the generation graph."""
    from vkr_core.steps import Gate, Generator

    return [
        n for n, s in registry.steps.items() if isinstance(s, (Gate, Generator)) and s.uses_model
    ]


class Run:
    """An open run directory. Use as ``async with Run(...) as run: await run.process(video)``."""

    def __init__(
        self,
        run_dir: str | Path,
        pool: str | Path | Pool,
        config: RunConfig | None = None,
        pm: VkrPluginManager | None = None,
        force: bool = False,
    ):
        self.pm = pm or get_plugin_manager()
        self.registry = self.pm.registry
        self.config = config or RunConfig()
        self.pool = pool if isinstance(pool, Pool) else load_pool(pool)
        register_secrets(spec.api_key() for spec in self.pool.models)
        registry_path = self.pool.registry_path()
        if registry_path is None:
            raise InputError(
                "the pool names no eligibility registry (`registry:`): run `vkr qualify` pilots "
                "or write one (step -> model -> eligible)"
            )
        self.eligibility: EligibilityRegistry = load_registry(registry_path)
        unknown = sorted(set(self.eligibility.steps) - set(self.registry.steps))
        if unknown:
            # A registry may cover steps of plugins that are not loaded in this run.
            log.info("eligibility registry covers steps not loaded", steps=unknown)
        self.router = Router(
            self.pool,
            self.eligibility,
            self.registry.steps,
            self.config.seed,
            self.config.allow_stale,
        )
        self.router.check(model_steps(self.registry))
        skills = self.config.skills or sorted(self.registry.skills)
        for skill in skills:
            self.registry.get("skill", skill)
        # Every skill needs seeds: its plugin's, or the --seed-bank's (which wins per skill).
        self.seed_bank = SeedBank.for_run(self.registry, skills, self.config.seed_bank)
        self.store = RunStore(run_dir)
        # Before anything is written: a second process on the same directory is refused.
        self.store.run_lock.acquire(" ".join([Path(sys.argv[0]).name, *sys.argv[1:2]]))
        try:
            self.store.check_config(self.snapshot(), force=force)
        except BaseException:
            self.store.run_lock.release()
            raise
        self._checkpointer_cm: Any = None
        self.graph: Any = None
        self.caller: ModelCaller | None = None
        self.call_listeners: list[Callable[[CallRecord], None]] = []
        self.drain_task: Any = None

    def _on_preflight(self, record: CallRecord) -> None:
        # Beside calls.jsonl, not in it: a reach check is not a step's call (most are free).
        with (self.store.root / "preflight.jsonl").open("a", encoding="utf-8") as handle:
            handle.write(record.model_dump_json() + "\n")
        if self.caller is not None and self.caller.budget is not None:
            self.caller.budget.add(record.cost_usd)

    def _on_call(self, record: CallRecord) -> None:
        self.store.append_call(record)
        for listener in self.call_listeners:
            listener(record)

    def snapshot(self) -> dict[str, Any]:
        return {
            "config": self.config.model_dump(),
            "pool": self.pool.model_dump(exclude={"source_path", "registry"}),
            "eligibility": self.eligibility.model_dump(),
            "steps": {name: step.version() for name, step in sorted(self.registry.steps.items())},
        }

    async def __aenter__(self) -> Run:
        from graphs.generation import build_graph
        from vkr_core.batch import spent_in
        from vkr_core.checkpoints import open_checkpointer
        from vkr_core.limits import SpendLimit
        from vkr_core.preflight import preflight

        for name in sorted({spec.provider for spec in self.pool.models}):
            provider = self.registry.providers.get(name)
            if provider is not None:  # in the background, while preflight and decoding run
                provider.warm_up([s for s in self.pool.models if s.provider == name])
        health = self.router.health
        health.cooldown = self.config.cooldown
        health.notify = _tell
        budget = None
        if self.config.max_spend is not None:
            # The limit is for the run directory: what earlier invocations paid counts.
            budget = SpendLimit(self.config.max_spend, spent_in(self.store.root))
        self.caller = ModelCaller(
            cache_dir=self.store.cache_dir,
            providers=self.registry.providers,
            on_record=self._on_call,
            health=health,
            budget=budget,
        )
        try:
            await preflight(
                self.router,
                model_steps(self.registry),
                self.registry.providers,
                health,
                reach=not self.config.skip_preflight,
                timeout=self.config.preflight_timeout,
                on_record=self._on_preflight,
                warn=_tell,
            )
        except BaseException:
            await self.__aexit__(None, None, None)
            raise
        self._checkpointer_cm = open_checkpointer(self.store.checkpoint_path)
        checkpointer = await self._checkpointer_cm.__aenter__()
        self.graph = build_graph(self.registry, checkpointer)
        self.context = RunContext(
            registry=self.registry,
            router=self.router,
            caller=self.caller,
            config=self.config,
            store=self.store,
            seed_bank=self.seed_bank,
        )
        return self

    async def __aexit__(self, *exc: Any) -> None:
        try:
            if self._checkpointer_cm is not None:
                await self._checkpointer_cm.__aexit__(*exc)
            if self.caller is not None:
                await self.caller.aclose()
        finally:
            self.store.run_lock.release()

    async def process(self, video: Video) -> VideoRecord:
        """One video through the graph; a failure is recorded, never raised past the run."""
        from graphs.generation import process_video

        try:
            if not self.store.record_path(video.video_id).exists():
                # Until its last round has an outcome the video is unfinished on disk, so a
                # run stopped in between is visible to split, export and the report.
                self.store.write_record(
                    VideoRecord(
                        video_id=video.video_id,
                        video=video,
                        status="unfinished",
                        planned=self.context.planned_rounds(),
                    )
                )
            return await process_video(
                self.graph, video, self.context, retry_failed=self.config.retry_failed
            )
        except DiskFull as exc:
            raise self.store.disk_full_error(exc) from None
        except CallFailed as exc:
            reason = f"model calls failed: {exc}"
        except VkrError as exc:
            reason = str(exc)
        except Exception as exc:
            # A full disk stops the whole run (every other video would fail the same way);
            # anything else is this video's failure, recorded, and the run goes on.
            if is_disk_full(exc):
                raise self.store.disk_full_error(exc) from None
            reason = f"{type(exc).__name__}: {exc}"
        self.store.add_failure(video.video_id, reason, video.path)
        log.warning("video failed", video_id=video.video_id, reason=reason)
        return VideoRecord(video_id=video.video_id, video=video, status="failed", failure=reason)


def funnel(
    records: Iterable[VideoRecord] | FunnelCounts, gate_names: list[str]
) -> list[tuple[str, int]]:
    """Examples left after each stage (the report's funnel, as (stage, count) pairs), from
    records or from the counts a run kept of them."""
    from corpus.report import funnels

    return [(row["stage"], row["count"]) for row in funnels(records, gate_names)["overall"]]


async def generate_videos(
    videos: list[Video],
    run_dir: str | Path,
    pool: str | Path | Pool,
    config: RunConfig | None = None,
    pm: VkrPluginManager | None = None,
    force: bool = False,
) -> list[VideoRecord]:
    """Process a few videos one after another in one run directory; returns their records.

    For many videos use ``run_manifest``, which keeps counters instead of records.
    """
    seen: set[str] = set()
    for video in videos:
        if video.video_id in seen:
            raise InputError(f"video id {video.video_id!r} appears twice")
        seen.add(video.video_id)
    async with Run(run_dir, pool, config, pm, force) as run:
        return [await run.process(video) for video in videos]


def format_funnel(rows: list[tuple[str, int]]) -> str:
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"  {name:<{width}}  {count:>5}" for name, count in rows)


async def run_manifest(
    videos: list[Video],
    run_dir: str | Path,
    pool: str | Path | Pool,
    config: RunConfig | None = None,
    pm: VkrPluginManager | None = None,
    force: bool = False,
    concurrency: int = 4,
    target_accepted: int | None = None,
    progress: bool = True,
    problems: list[Any] = (),  # type: ignore[assignment]
) -> BatchCounters:
    """`vkr run`: many videos at once in one run directory; returns the run's counters.

    Records and call records are in the run directory (``RunStore.iter_records``,
    ``iter_calls``); the counters hold what the end of a run prints (videos done, failed
    and unfinished, the funnel per stage and skill, calls and spend), so memory stays flat
    however many videos there are. With ``config.max_spend``, no video and no request
    starts once the run directory's spend reaches it; the calls in flight land, and
    ``counters.stopped`` says "budget".
    """
    import asyncio

    from vkr_core.batch import BatchCounters, ProgressDisplay, run_batch

    counters = BatchCounters(total=len(videos))
    async with Run(run_dir, pool, config, pm, force) as run:
        stop_on_interrupt(run)
        for problem in problems:  # manifest lines that never became a video
            run.store.add_failure(f"manifest-line-{problem.line}", problem.reason, problem.path)
        run.call_listeners.append(counters.on_call)
        caller = run.caller
        assert caller is not None
        # The caller lists every record it emits (for a pilot's few calls); over a run that
        # list would grow by ~30 records a video. They are in calls.jsonl and the counters.
        run.call_listeners.append(lambda _record: caller.records.clear())
        # diskcache's defaults map up to 64 MB of cache.db into memory and keep up to 32 MB
        # of its pages: both fill as the cache grows with the run (40 MB of cache.db at 2,000
        # videos). Lookups are by key; the OS file cache serves them as well.
        caller.cache.reset("sqlite_mmap_size", 0)
        caller.cache.reset("sqlite_cache_size", CALL_CACHE_PAGES)
        budget = caller.budget
        with ProgressDisplay(counters, enabled=progress) as display:
            batch = asyncio.create_task(
                run_batch(
                    run.process,
                    videos,
                    counters,
                    concurrency,
                    target_accepted,
                    on_video=lambda _record: display.update(),
                    should_stop=caller.holding,
                )
            )

            async def stop_at_budget() -> None:
                assert budget is not None
                await budget.wait()
                if batch.done():
                    return
                _tell(
                    f"stopping: --max-spend ${budget.limit_usd:g} reached (this run directory "
                    f"has spent ${budget.spent_usd:.4f}); finishing the model calls in flight"
                )
                await caller.drain()
                batch.cancel()

            watcher = asyncio.create_task(stop_at_budget()) if budget is not None else None
            try:
                await batch
            except asyncio.CancelledError:
                current = asyncio.current_task()
                if current is not None and current.cancelling():
                    raise  # Ctrl-C: the caller of run_manifest says so
            finally:
                if watcher is not None:
                    watcher.cancel()
        if budget is not None and budget.reached and counters.done + counters.failed < len(videos):
            counters.stopped = "budget"
    return counters


def _tell(message: str) -> None:
    """A line for the person running vkr: outages, pauses, budget (stderr, not the log)."""
    print(message, file=sys.stderr, flush=True)


def stop_on_interrupt(run: Run) -> None:
    """First Ctrl-C: start no new call, wait for the calls in flight to land in the cache (a
    cancelled request is still billed), then stop. Second Ctrl-C: stop at once."""
    import asyncio
    import signal
    import sys

    loop = asyncio.get_running_loop()
    main = asyncio.current_task()

    async def stop_when_drained() -> None:
        assert run.caller is not None
        await run.caller.drain()
        if main is not None:
            main.cancel()

    def on_interrupt() -> None:
        assert run.caller is not None
        if not run.caller.stopping:
            run.caller.stopping = True
            print(
                "\nstopping: finishing the model calls in flight (Ctrl-C again to stop at once)",
                file=sys.stderr,
                flush=True,
            )
            run.drain_task = loop.create_task(stop_when_drained())
        elif main is not None:
            main.cancel()

    try:
        loop.add_signal_handler(signal.SIGINT, on_interrupt)
    except (NotImplementedError, RuntimeError):  # not the main thread, or no signals here
        pass
