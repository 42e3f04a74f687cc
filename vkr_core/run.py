"""The engine's run: config snapshot, router check, caller, checkpointer and the pipeline.

``Run`` knows no concrete pipeline, step or skill: it opens what every pipeline needs and
hands each item to the pipeline the config names (``vkr_register_pipelines``). Everything
that can be wrong with the inputs is found when it opens, before any call is paid for.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vkr_core.backends import ItemStatus, state_backend
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
from vkr_core.pipelines import Pipeline, PipelineRun
from vkr_core.plugins import VkrPluginManager, get_plugin_manager
from vkr_core.router import Router
from vkr_core.schemas import CallRecord, InputError, RunStopped, VkrError
from vkr_core.steps import response_format
from vkr_core.store import DiskFull, RunStore, is_disk_full

if TYPE_CHECKING:
    from pydantic import BaseModel

    from vkr_core.batch import BatchCounters

log = get_logger("vkr.run")

BACKEND_KINDS = ("checkpointer", "call_cache", "status", "executor")
# The seams a state URL (RunConfig.state) chooses together.
STATE_KINDS = ("checkpointer", "call_cache", "status")


class Run:
    """An open run directory. Use as ``async with Run(...) as run: await run.process(video)``."""

    def __init__(
        self,
        run_dir: str | Path,
        pool: str | Path | Pool,
        config: RunConfig | None = None,
        pm: VkrPluginManager | None = None,
        force: bool = False,
        joined: bool = False,
    ):
        """``joined``: open a run its driver holds, from a worker process of a distributed
        executor: no lock is taken, and the driver's config snapshot is compared (a worker
        whose plugins or settings differ is refused), never written."""
        self.pm = pm or get_plugin_manager()
        self.registry = self.pm.registry
        self.config = config or RunConfig()
        self.pipeline: Pipeline = self.registry.get("pipeline", self.config.pipeline)
        # Unknown backend names fail here, before the run directory is touched.
        self.backends = {kind: self._backend(kind) for kind in BACKEND_KINDS}
        self.pool = pool if isinstance(pool, Pool) else load_pool(pool)
        register_secrets(spec.api_key() for spec in self.pool.models)
        for spec in self.pool.models:  # provider options, before the directory is written
            provider = self.registry.providers.get(spec.provider)
            if provider is not None:
                provider.check_entry(spec)
        if any(spec.structured_output for spec in self.pool.models):
            # A step schema that cannot be sent stops the run here, not every item later.
            for name in self.model_steps():
                step = self.registry.steps.get(name)
                if step is not None:
                    response_format(step)
        registry_path = self.pool.registry_path()
        self.eligibility: EligibilityRegistry
        if registry_path is not None:
            self.eligibility = load_registry(registry_path)
        elif not self.model_steps():
            # The pipeline routes nothing: it calls the models it was given by name.
            self.eligibility = EligibilityRegistry()
        else:
            raise InputError(
                "the pool names no eligibility registry (`registry:`): run `vkr qualify` pilots "
                "or write one (step -> model -> eligible)"
            )
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
        self.router.check(self.model_steps())
        self.pipeline.check(self)
        self.fixed_models = self.pipeline.fixed_models(self)
        for backend in self.backends.values():  # a missing extra, an unreachable server
            backend.check(self.config)
        self.store = RunStore(run_dir, joined=joined)
        # Before anything is written: a second process on the same directory is refused,
        # unless both share their state (claims keep them off each other's items).
        self.store.run_lock.acquire(
            " ".join([Path(sys.argv[0]).name, *sys.argv[1:2]]), shared=bool(self.config.state)
        )
        try:
            self.store.check_config(self.snapshot(), force=force)
        except BaseException:
            self.store.run_lock.release()
            raise
        self._checkpointer_cm: Any = None
        self.active: PipelineRun | None = None
        self.caller: ModelCaller | None = None
        self.call_listeners: list[Callable[[CallRecord], None]] = []
        self.drain_task: Any = None
        self.status = ItemStatus()
        # Items another live driver held when their turn came: tried again at the end.
        self.held: list[Any] = []
        # Items done before (by any driver), not processed again.
        self.skipped = 0

    def _backend(self, kind: str) -> Any:
        if self.config.state and kind in STATE_KINDS:
            return state_backend(self.registry, kind, self.config.state)
        name = getattr(self.config, kind, None) or "none"
        return self.registry.get("backend", f"{kind}:{name}")

    def model_steps(self) -> list[str]:
        """The model-backed steps the run's pipeline calls."""
        return self.pipeline.model_steps(self.registry)

    def _on_preflight(self, record: CallRecord) -> None:
        # Beside the call log, not in it: a reach check is not a step's call (most are free).
        self.store.append_preflight(record)
        if self.caller is not None and self.caller.budget is not None:
            self.caller.budget.add(record.cost_usd)

    def heard(self, record: CallRecord) -> None:
        """A call record made in another process of the run (a worker) and already in the
        call log: the budget and the listeners hear it as if this process had made it."""
        if self.caller is not None and self.caller.budget is not None and not record.cache_hit:
            self.caller.budget.add(record.cost_usd)
        for listener in self.call_listeners:
            listener(record)

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
            # The verdict steps in the order they ran: the report reads it from here.
            "gate_order": self.pipeline.gate_order(self.registry),
            "pipeline": self.pipeline.snapshot(self),
        }

    async def __aenter__(self) -> Run:
        from vkr_core.limits import SpendLimit
        from vkr_core.preflight import preflight
        from vkr_core.store import spent_in

        # Only the models the run may call: a provider that starts a server per model (vLLM)
        # must not load weights no step of this run uses.
        in_use = {s.name for s in self.router.models_in_use(self.model_steps())}
        in_use |= {s.name for s in self.fixed_models}
        specs = [s for s in self.pool.models if s.name in in_use]
        for name in sorted({spec.provider for spec in specs}):
            provider = self.registry.providers.get(name)
            if provider is not None:  # in the background, while preflight and decoding run
                provider.use_folder(self.store.layout.provider_files(name))
                provider.warm_up([s for s in specs if s.provider == name])
        health = self.router.health
        health.cooldown = self.config.cooldown
        health.notify = _tell
        budget = None
        if self.config.max_spend is not None:
            # The limit is for the run directory: what earlier invocations paid counts.
            budget = SpendLimit(self.config.max_spend, spent_in(self.store.root))
        self.caller = ModelCaller(
            cache_dir=self.store.cache_dir,
            cache=self.backends["call_cache"].open(self.store),
            providers=self.registry.providers,
            on_record=self._on_call,
            health=health,
            budget=budget,
        )
        try:
            await preflight(
                self.router,
                self.model_steps(),
                self.registry.providers,
                health,
                reach=not self.config.skip_preflight,
                timeout=self.config.preflight_timeout,
                on_record=self._on_preflight,
                warn=_tell,
                required=self.fixed_models,
            )
        except BaseException:
            await self.__aexit__(None, None, None)
            raise
        try:
            self.status = await self.backends["status"].open(self.store)
        except BaseException:
            await self.__aexit__(None, None, None)
            raise
        self._checkpointer_cm = self.backends["checkpointer"].open(self.store)
        checkpointer = await self._checkpointer_cm.__aenter__()
        self.context = RunContext(
            registry=self.registry,
            router=self.router,
            caller=self.caller,
            config=self.config,
            store=self.store,
            pm=self.pm,
            status=self.status,
        )
        self.active = await self.pipeline.open(self.context, checkpointer)
        return self

    async def __aexit__(self, *exc: Any) -> None:
        try:
            if self.active is not None:
                await self.active.close()
            if self._checkpointer_cm is not None:
                await self._checkpointer_cm.__aexit__(*exc)
            if self.caller is not None:
                await self.caller.aclose()
            await self.status.close()
        finally:
            self.store.run_lock.release()

    async def prepare(self, item: Any) -> None:
        """The pipeline's work ahead of an item's turn (decoding); its errors surface when
        the item is processed, where they are recorded."""
        try:
            assert self.active is not None, "prepare() needs an open run (async with Run(...))"
            await self.active.prepare(item)
        except Exception as exc:  # recorded by process(), which meets it again
            log.debug("prepare failed", item=self.pipeline.item_id(item), error=str(exc))

    async def process(self, item: Any) -> BaseModel | None:
        """One item through the pipeline; a failure is recorded, never raised past the run.

        None when the item is not this driver's to process: done before, or held by another
        driver sharing the run's state (then it is in ``held``, to try again later).
        """
        item_id = self.pipeline.item_id(item)
        claim = await self.status.claim(item_id)
        if claim != "claimed":
            if claim == "held":
                self.held.append(item)
            else:
                self.skipped += 1
            return None
        record = None
        try:
            record = await self._process(item)
        finally:
            status = getattr(record, "status", None)
            if status in ("done", "failed"):
                await self.status.finish(item_id, status)
            else:  # stopped before its record: another driver may take it now
                await self.status.release(item_id)
        return record

    async def _process(self, item: Any) -> BaseModel:
        try:
            assert self.active is not None, "process() needs an open run (async with Run(...))"
            return await self.active.process(item)
        except DiskFull as exc:
            raise self.store.disk_full_error(exc) from None
        except RunStopped:
            raise
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
        item_id = self.pipeline.item_id(item)
        self.store.add_failure(item_id, reason, getattr(item, "path", None))
        log.warning("item failed", item_id=item_id, reason=reason)
        return self.pipeline.failed(item, reason)


async def process_items(
    items: list[Any],
    run_dir: str | Path,
    pool: str | Path | Pool,
    config: RunConfig | None = None,
    pm: VkrPluginManager | None = None,
    force: bool = False,
) -> list[Any]:
    """Process a few items one after another in one run directory; returns their records.

    For many items use ``run_items``, which keeps counters instead of records.
    """
    pm = pm or get_plugin_manager()
    config = config or RunConfig()
    pipeline: Pipeline = pm.registry.get("pipeline", config.pipeline)
    seen: set[str] = set()
    for item in items:  # before the run directory is touched
        item_id = pipeline.item_id(item)
        if item_id in seen:
            raise InputError(f"{pipeline.id_field.replace('_', ' ')} {item_id!r} appears twice")
        seen.add(item_id)
    async with Run(run_dir, pool, config, pm, force) as run:
        return [await run.process(item) for item in items]


async def run_items(
    items: list[Any],
    run_dir: str | Path,
    pool: str | Path | Pool,
    config: RunConfig | None = None,
    pm: VkrPluginManager | None = None,
    force: bool = False,
    concurrency: int = 4,
    target_accepted: int | None = None,
    progress: bool = True,
    problems: list[Any] = (),  # type: ignore[assignment]
    on_call: Callable[[CallRecord], None] | None = None,
) -> BatchCounters:
    """`vkr run`: many items at once in one run directory; returns the run's counters.

    Records and call records are in the run directory (``RunStore.iter_records``,
    ``iter_calls``); the counters hold what the end of a run prints (videos done, failed
    and unfinished, the funnel per stage and skill, calls and spend), so memory stays flat
    however many videos there are. With ``config.max_spend``, no video and no request
    starts once the run directory's spend reaches it; the calls in flight land, and
    ``counters.stopped`` says "budget". ``on_call`` hears every call record of the run (what
    a pipeline's own summary counts beyond the counters).
    """
    import asyncio

    from vkr_core.batch import BatchCounters, ProgressDisplay

    counters = BatchCounters(total=len(items))
    async with Run(run_dir, pool, config, pm, force) as run:
        counters.accepted_in = run.pipeline.accepted
        counters.funnel = run.pipeline.tally()
        stop_on_interrupt(run)
        for problem in problems:  # manifest lines that never became a video
            run.store.add_failure(f"manifest-line-{problem.line}", problem.reason, problem.path)
        run.call_listeners.append(counters.on_call)
        if on_call is not None:
            run.call_listeners.append(on_call)
        caller = run.caller
        assert caller is not None
        # The caller lists every record it emits (for a pilot's few calls); over a run that
        # list would grow by ~30 records a video. They are in calls.jsonl and the counters.
        run.call_listeners.append(lambda _record: caller.records.clear())
        run.backends["call_cache"].tune_for_long_runs(caller.cache)
        budget = caller.budget
        with ProgressDisplay(counters, enabled=progress) as display:

            async def every_item() -> None:
                pending = items
                while pending:
                    run.held = []
                    await run.backends["executor"].run(
                        run.process,
                        pending,
                        counters,
                        concurrency=concurrency,
                        target_accepted=target_accepted,
                        on_item=lambda _record: display.update(),
                        should_stop=caller.holding,
                        prepare=run.prepare,
                        run=run,
                    )
                    pending = run.held
                    if pending and not caller.holding():
                        # Held by another live driver: it finishes them, or its claims
                        # expire (it died) and this driver takes them.
                        await asyncio.sleep(run.status.retry_after)
                    else:
                        break

            batch = asyncio.create_task(every_item())

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
        counters.skipped = run.skipped
        if budget is not None and budget.reached and counters.done + counters.failed < len(items):
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
