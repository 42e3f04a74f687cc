"""`vkr run --engine ray`: the run's items on a Ray cluster's workers.

The split. The driver (the `vkr run` process) opens the run as the local engine does: lock,
config snapshot, preflight, report. It starts N worker actors; each opens its own view of the
same run (``Run(..., joined=True)``: no lock, the driver's config snapshot compared and never
written) with its own event loop, HTTP clients, cache and checkpointer connections, and
processes the items the driver hands it, ``--concurrency`` split across the workers. Records,
call records, frames, checkpoints and the call cache land in the run directory (or the
shared state) exactly as a local run's do, so `vkr report`, `split` and `export` read them
unchanged; the driver folds each item's record and the workers' call records into the
counters the end of the run prints.

Exactly once. Every reply a worker reads is in the shared call cache (and journal) before
its node returns, so an item handed to another worker after its first one died resumes from
its checkpoint and replays those replies from the cache. The driver hands an item to one
worker at a time, and to another only once Ray reports the first dead.

Per-model limits are cluster-wide: one limiter actor holds each model's AIMD limiter
(``vkr_core.limits.ModelLimiter``), and the workers' callers take their slots from it, so a
pool's ``max_concurrency: 8`` is 8 requests in flight across the cluster, and a 429 seen by
any worker slows every worker down. So is ``--max-spend``: the same actor adds up what
every worker paid, and each worker stops sending at the run's limit.
"""

from __future__ import annotations

import asyncio
import os
import sys
import uuid
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vkr_core.backends import Backend, ExecutorBackend, state_password
from vkr_core.hookspecs import hookimpl
from vkr_core.limits import SpendLimit
from vkr_core.log import get_logger
from vkr_core.schemas import CallRecord, InputError, VkrError

log = get_logger("vkr.ray")

INSTALL_HINT = "the Ray engine needs Ray: pip install 'vkr[ray]'"
# How often the driver collects the workers' call records (progress line, --max-spend).
CALLS_EVERY_S = 0.5
# A worker that dies this many times with the same item in hand fails the item: something
# about it (a decoder bug, its memory) kills whoever takes it.
DEATHS_PER_ITEM = 3
# Settings of the driver's environment its workers take: never a key (each node has its
# own, in the variables the pool names).
WORKER_ENV = ("LITELLM_LOCAL_MODEL_COST_MAP", "VKR_STATE_LEASE")


def import_ray() -> Any:
    """Ray, or a one-line InputError saying how to install it."""
    try:
        import ray
    except ImportError:
        raise InputError(INSTALL_HINT) from None
    return ray


def split_concurrency(concurrency: int, workers: int) -> list[int]:
    """Each worker's share of ``--concurrency``: as even as it gets, the first ones taking
    the remainder (10 over 4 workers: 3, 3, 2, 2)."""
    if workers > concurrency:
        raise InputError(
            f"--workers {workers} is more than --concurrency {concurrency}: each worker needs "
            "at least one item in flight; raise --concurrency or lower --workers"
        )
    return [
        concurrency // workers + (1 if i < concurrency % workers else 0) for i in range(workers)
    ]


# ---------------------------------------------------------------- cluster-wide limits


class ClusterLimits:
    """Each model's limiter, for the whole cluster (a Ray actor: one per run).

    Slots are counted per holder (a worker incarnation), so a worker that dies holding slots
    gives them back (``forget``) instead of shrinking the cluster's limit for good.
    """

    def __init__(
        self, models: dict[str, tuple[int, int | None, int | None]], spent_usd: float = 0.0
    ):
        from vkr_core.limits import ModelLimiter

        self.limiters = {name: ModelLimiter(*spec) for name, spec in models.items()}
        self.held: dict[str, Counter[str]] = {}
        self.gone: set[str] = set()
        self.peak: Counter[str] = Counter()
        # What the run directory has paid, every worker's calls included (--max-spend).
        self.spent_usd = spent_usd

    def spend(self, cost_usd: float) -> float:
        """Add a paid call's cost; returns what the whole run has paid."""
        self.spent_usd += cost_usd
        return self.spent_usd

    async def acquire(self, model: str, holder: str, tokens: int = 0) -> bool:
        """Wait for a slot of ``model``; False when the holder was given up for dead."""
        if holder in self.gone:
            return False
        limiter = self.limiters[model]
        await limiter.acquire(tokens)
        if holder in self.gone:
            await limiter.release(ok=False)
            return False
        self.held.setdefault(holder, Counter())[model] += 1
        self.peak[model] = max(self.peak[model], limiter.in_flight)
        return True

    async def release(
        self,
        model: str,
        holder: str,
        ok: bool,
        rate_limited: bool = False,
        retry_after: float | None = None,
    ) -> None:
        slots = self.held.get(holder)
        if not slots or slots[model] <= 0:
            return  # forgotten already: its slots went back when it was given up
        slots[model] -= 1
        await self.limiters[model].release(
            ok=ok, rate_limited=rate_limited, retry_after=retry_after
        )

    async def forget(self, holder: str) -> int:
        """Give back every slot of a dead holder; returns how many it held."""
        self.gone.add(holder)
        freed = 0
        for model, count in self.held.pop(holder, Counter()).items():
            for _ in range(count):
                await self.limiters[model].release(ok=False)
            freed += count
        return freed

    def state(self) -> dict[str, dict[str, float]]:
        """Per model: requests in flight, current (AIMD) limit, highest in flight seen."""
        return {
            name: {"in_flight": lim.in_flight, "limit": lim.limit, "peak": self.peak[name]}
            for name, lim in self.limiters.items()
        }


class ClusterLimiter:
    """What a worker's caller takes a model's slots from: the cluster's limiter.

    ``acquire`` is one round trip to the limits actor (a millisecond or two, against model
    latencies of a second); ``release`` is not awaited, so a finished call never waits for
    it (calls from one worker reach the actor in order).
    """

    def __init__(self, limits: Any, model: str, holder: str):
        self.limits = limits
        self.model = model
        self.holder = holder

    async def acquire(self, tokens: int = 0) -> None:
        ref = self.limits.acquire.remote(self.model, self.holder, tokens)
        try:
            granted = await ref
        except asyncio.CancelledError:
            # The slot may still be granted after the call gave up on it: give it back then.
            asyncio.ensure_future(self._give_back(ref))
            raise
        if not granted:
            raise VkrError("this Ray worker was given up for dead by the driver")

    async def _give_back(self, ref: Any) -> None:
        try:
            if await ref:
                self.limits.release.remote(self.model, self.holder, False)
        except Exception:  # the actor is gone with the run: nothing to give back to
            pass

    async def release(
        self, *, ok: bool, rate_limited: bool = False, retry_after: float | None = None
    ) -> None:
        self.limits.release.remote(self.model, self.holder, ok, rate_limited, retry_after)


class ClusterSpend(SpendLimit):
    """A worker's ``--max-spend``: its own calls, and every other worker's as the limits
    actor last reported them, so the workers stop together at the run's limit instead of
    each spending up to it (N workers, N times the limit)."""

    def __init__(self, limit_usd: float, spent_usd: float, limits: Any):
        super().__init__(limit_usd, spent_usd)
        self.limits = limits

    def add(self, cost_usd: float) -> None:
        super().add(cost_usd)
        told = asyncio.wrap_future(self.limits.spend.remote(cost_usd).future())
        told.add_done_callback(self._heard)

    def _heard(self, told: asyncio.Future[float]) -> None:
        if told.cancelled() or told.exception() is not None:
            return  # the actor is gone with the run: this worker's own count still holds
        total = told.result()
        if total > self.spent_usd:
            super().add(total - self.spent_usd)


# ---------------------------------------------------------------- the worker


@dataclass
class Outcome:
    """What a worker says about one item it was given."""

    # None: not processed by this run (not launched because the run stops, done before, or
    # held by another driver: ``held``).
    record: Any = None
    launched: bool = False
    held: bool = False


@dataclass
class WorkerSettings:
    run_dir: str
    cwd: str
    pool: Any
    config: Any
    share: int
    holder: str
    limits: Any
    log_level: str = "WARNING"
    env: dict[str, str] = field(default_factory=dict)


class RunWorker:
    """One Ray worker's part of a run (a Ray actor with its own asyncio loop)."""

    def __init__(self, settings: WorkerSettings):
        self.settings = settings
        self.run: Any = None
        self._opening: asyncio.Lock | None = None
        self.calls: list[CallRecord] = []
        self.holding = False
        self.tasks: set[asyncio.Task[Any]] = set()
        self.slots: asyncio.Semaphore | None = None

    def pid(self) -> int:
        return os.getpid()

    def remember_state_password(self, url: str, password: str) -> None:
        """The password of the run's state URL: the config carries the URL without it, and
        the driver's copy lives in the driver's process only."""
        from vkr_core.backends import remember_password
        from vkr_core.log import register_secrets

        register_secrets([password])
        remember_password(url, password)

    async def _open(self) -> Any:
        if self._opening is None:
            self._opening = asyncio.Lock()
        async with self._opening:
            if self.run is not None:
                return self.run
            s = self.settings
            os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
            for name, value in s.env.items():
                os.environ[name] = value  # the driver's: every worker on the same lease
            # Relative paths in the pool, the manifest or a seed bank mean what they mean to
            # the driver when its folder is here too (one machine, or a shared path).
            if os.path.isdir(s.cwd):
                os.chdir(s.cwd)
            from vkr_core.log import configure_logging
            from vkr_core.plugins import get_plugin_manager
            from vkr_core.run import Run

            configure_logging(s.log_level)
            run = Run(s.run_dir, s.pool, s.config, get_plugin_manager(), joined=True)
            await run.__aenter__()
            run.call_listeners.append(self.calls.append)
            caller = run.caller
            assert caller is not None
            run.call_listeners.append(lambda _record: caller.records.clear())
            run.backends["call_cache"].tune_for_long_runs(caller.cache)
            for spec in run.pool.models:
                caller.limiters[spec.name] = ClusterLimiter(  # type: ignore[assignment]
                    s.limits, spec.name, s.holder
                )
            if caller.budget is not None:
                caller.budget = ClusterSpend(
                    caller.budget.limit_usd, caller.budget.spent_usd, s.limits
                )
            self.slots = asyncio.Semaphore(s.share)
            self.run = run
            return run

    async def process(self, item: Any) -> Outcome:
        run = await self._open()
        task = asyncio.current_task()
        assert task is not None and self.slots is not None
        self.tasks.add(task)
        try:
            await run.prepare(item)
            async with self.slots:
                if self.holding:
                    return Outcome()
                held_before = len(getattr(run, "held", ()))
                record = await run.process(item)
            held = record is None and len(getattr(run, "held", ())) > held_before
            return Outcome(record=record, launched=True, held=held)
        finally:
            self.tasks.discard(task)

    def take_calls(self) -> list[CallRecord]:
        calls, self.calls[:] = list(self.calls), []
        return calls

    def hold(self) -> None:
        """Launch no new item (the run reached its target, or stops)."""
        self.holding = True

    async def stop(self) -> list[CallRecord]:
        """Stop: no new request; the calls in flight land in the cache; then the items still
        running are cancelled (they resume from their checkpoints on the next run)."""
        self.holding = True
        if self.run is not None and self.run.caller is not None:
            self.run.caller.stopping = True
            await self.run.caller.drain()
        for task in list(self.tasks):
            task.cancel()
        return self.take_calls()

    async def close(self) -> list[CallRecord]:
        if self.run is not None:
            run, self.run = self.run, None
            await run.__aexit__(None, None, None)
        return self.take_calls()


# ---------------------------------------------------------------- the driver


@dataclass
class _Slot:
    """A worker place: its share of the concurrency and the actor filling it now."""

    index: int
    share: int
    actor: Any = None
    name: str = ""
    generation: int = 0
    in_flight: int = 0
    dead: bool = False


class RayExecutor(ExecutorBackend):
    """Items on a Ray cluster's workers (``vkr run --engine ray``)."""

    name = "ray"

    def check(self, config: Any) -> None:
        import_ray()
        options = dict(getattr(config, "executor_options", None) or {})
        workers = options.get("workers")
        if workers is not None and int(workers) < 1:
            raise InputError(f"--workers {workers}: at least one worker")

    async def run(
        self,
        process: Callable[[Any], Awaitable[Any]],
        items: Iterable[Any],
        counters: Any,
        *,
        concurrency: int,
        target_accepted: int | None,
        on_item: Callable[[Any], None] | None,
        should_stop: Callable[[], bool],
        prepare: Callable[[Any], Awaitable[None]] | None,
        run: Any = None,
    ) -> Any:
        if run is None:
            raise VkrError("the Ray executor needs the engine's Run (vkr_core.run.run_items)")
        ray = import_ray()
        options = dict(getattr(run.config, "executor_options", None) or {})
        started_ray = connect(ray, options.get("address"))
        try:
            return await _drive(
                ray,
                run,
                list(items),
                counters,
                concurrency=concurrency,
                workers=options.get("workers"),
                target_accepted=target_accepted,
                on_item=on_item,
                should_stop=should_stop,
            )
        finally:
            if started_ray:
                ray.shutdown()


def connect(ray: Any, address: str | None) -> bool:
    """Join the cluster at ``address``, or start a local one; True when this process started
    it (and so shuts it down). A process already connected (a test's session) stays so."""
    import logging

    if ray.is_initialized():
        return False
    try:
        ray.init(
            address=address or None,
            include_dashboard=False,
            logging_level=logging.WARNING,
            configure_logging=True,
        )
    except ConnectionError as exc:
        raise InputError(f"cannot reach the Ray cluster at {address}: {exc}") from None
    return True


def _cluster_workers(ray: Any, concurrency: int) -> int:
    cpus = int(ray.cluster_resources().get("CPU", 1))
    return max(1, min(cpus, concurrency))


async def _drive(
    ray: Any,
    run: Any,
    items: list[Any],
    counters: Any,
    *,
    concurrency: int,
    workers: int | None,
    target_accepted: int | None,
    on_item: Callable[[Any], None] | None,
    should_stop: Callable[[], bool],
) -> Any:
    count = int(workers) if workers else _cluster_workers(ray, concurrency)
    shares = split_concurrency(concurrency, count)
    run_id = uuid.uuid4().hex[:8]
    limits_actor = ray.remote(num_cpus=0, max_concurrency=100_000)(ClusterLimits)
    budget = run.caller.budget if run.caller is not None else None
    limits = limits_actor.options(name=f"vkr-limits-{run_id}").remote(
        {spec.name: (spec.max_concurrency, spec.rpm, spec.tpm) for spec in run.pool.models},
        budget.spent_usd if budget is not None else 0.0,
    )
    # One CPU each, so Ray spreads the workers over the cluster's machines.
    worker_actor = ray.remote(num_cpus=1, max_concurrency=100_000, max_restarts=0)(RunWorker)
    # The workers skip the reach check (the driver has made it) but still check their keys.
    worker_config = run.config.model_copy(update={"skip_preflight": True})
    slots = [_Slot(index=i, share=share) for i, share in enumerate(shares)]

    async def start(slot: _Slot) -> None:
        slot.generation += 1
        slot.name = f"vkr-{run_id}-w{slot.index}.{slot.generation}"
        settings = WorkerSettings(
            run_dir=str(Path(run.store.root).resolve()),
            cwd=os.getcwd(),
            pool=run.pool,
            config=worker_config,
            share=slot.share,
            holder=slot.name,
            limits=limits,
            log_level=_log_level(),
            env={name: os.environ[name] for name in WORKER_ENV if name in os.environ},
        )
        slot.actor = worker_actor.options(name=slot.name).remote(settings)
        if run.config.state and state_password(run.config.state) is not None:
            # A method call, not a creation argument (Ray's control store keeps those): it
            # lives in the worker's memory only. Awaited: an async actor's calls may start
            # out of order, and the worker needs it before it opens the run.
            await slot.actor.remember_state_password.remote(
                run.config.state, state_password(run.config.state)
            )
        slot.dead = False
        slot.in_flight = 0

    try:
        await asyncio.gather(*(start(slot) for slot in slots))
    except BaseException:
        for actor in [limits, *(slot.actor for slot in slots if slot.actor is not None)]:
            ray.kill(actor)
        raise

    queue: deque[Any] = deque(items)
    pending: dict[asyncio.Future[Any], tuple[Any, _Slot, int]] = {}
    deaths: Counter[str] = Counter()
    # Deaths since a worker last finished an item: workers that die whatever they are given
    # (a node without vkr's dependencies, out of memory at start) stop the run instead.
    deaths_in_a_row = 0
    holding = False
    errors: list[BaseException] = []
    held_later: list[Any] = []
    item_id = run.pipeline.item_id

    def fold(calls: list[CallRecord]) -> None:
        for record in calls:
            run.heard(record)

    def stop_launching() -> bool:
        reached = target_accepted is not None and counters.accepted >= target_accepted
        return reached or bool(errors) or should_stop()

    async def collect_calls() -> None:
        while True:
            await asyncio.sleep(CALLS_EVERY_S)
            for slot in slots:
                if slot.dead:
                    continue
                try:
                    fold(await slot.actor.take_calls.remote())
                except Exception:  # a dead worker: the item loop hears it too
                    pass

    def send(item: Any, slot: _Slot) -> None:
        future = asyncio.wrap_future(slot.actor.process.remote(item).future())
        pending[future] = (item, slot, slot.generation)
        slot.in_flight += 1
        counters.launched += 1

    async def worker_died(slot: _Slot, generation: int, item: Any, exc: BaseException) -> None:
        nonlocal deaths_in_a_row
        if slot.generation == generation and not slot.dead:
            slot.dead = True
            deaths_in_a_row += 1
            if deaths_in_a_row > DEATHS_PER_ITEM * len(slots):
                errors.append(
                    VkrError(f"Ray workers keep dying ({deaths_in_a_row} in a row; last: {exc})")
                )
            # Unavailable is not always dead (a lost connection): make sure it is before its
            # items go to another worker, or two workers could process one video.
            ray.kill(slot.actor, no_restart=True)
            freed = await limits.forget.remote(slot.name)
            _tell(
                f"Ray worker {slot.name} died ({type(exc).__name__}); its items go to the "
                f"other workers" + (f" ({freed} model slot(s) given back)" if freed else "")
            )
            await start(slot)
        deaths[item_id(item)] += 1
        if deaths[item_id(item)] >= DEATHS_PER_ITEM:
            reason = f"its Ray worker died {DEATHS_PER_ITEM} times while processing it"
            run.store.add_failure(item_id(item), reason, getattr(item, "path", None))
            failed = run.pipeline.failed(item, reason)
            counters.on_video(failed)
            if on_item is not None:
                on_item(failed)
        else:
            queue.appendleft(item)

    async def settle(future: asyncio.Future[Any]) -> None:
        nonlocal deaths_in_a_row
        item, slot, generation = pending.pop(future)
        if slot.generation == generation:
            slot.in_flight -= 1
        try:
            outcome: Outcome = future.result()
        except ray.exceptions.RayActorError as exc:
            counters.launched -= 1
            await worker_died(slot, generation, item, exc)
            return
        except ray.exceptions.RayTaskError as exc:
            counters.launched -= 1
            cause = getattr(exc, "cause", None)
            errors.append(cause if isinstance(cause, BaseException) else exc)
            return
        deaths_in_a_row = 0
        if outcome.record is None:
            counters.launched -= 1
            if outcome.held:
                held_later.append(item)
            elif outcome.launched and hasattr(run, "skipped"):
                run.skipped += 1
            return
        counters.on_video(outcome.record)
        if on_item is not None:
            on_item(outcome.record)

    collector = asyncio.create_task(collect_calls())
    try:
        while queue or pending or held_later:
            if not queue and not pending and held_later:
                await asyncio.sleep(getattr(getattr(run, "status", None), "retry_after", 1.0))
                queue.extend(held_later)
                held_later.clear()
            if stop_launching() and not holding:
                holding = True
                queue.clear()
                held_later.clear()
                for slot in slots:
                    if not slot.dead:
                        slot.actor.hold.remote()
            while queue:
                # Each worker takes its share in flight plus as many decoding ahead, as the
                # local engine's lookahead does.
                open_slots = [s for s in slots if not s.dead and s.in_flight < 2 * s.share]
                if not open_slots:
                    break
                slot = min(open_slots, key=lambda s: s.in_flight / s.share)
                send(queue.popleft(), slot)
            if not pending:
                continue
            done, _ = await asyncio.wait(list(pending), return_when=asyncio.FIRST_COMPLETED)
            for future in done:
                await settle(future)
        if errors:
            raise errors[0]
    except BaseException:
        # Ctrl-C, the budget, or an error: the workers' calls in flight land in the cache
        # first (a cancelled request is still billed), then their items stop.
        await asyncio.shield(_stop_all(slots, fold))
        for future in pending:
            future.cancel()
        raise
    finally:
        collector.cancel()
        await _close_all(ray, slots, fold)
        ray.kill(limits)
    return counters


async def _stop_all(slots: list[_Slot], fold: Callable[[list[CallRecord]], None]) -> None:
    async def stop(slot: _Slot) -> None:
        try:
            fold(await slot.actor.stop.remote())
        except Exception:
            pass

    await asyncio.gather(*(stop(s) for s in slots if not s.dead))


async def _close_all(
    ray: Any, slots: list[_Slot], fold: Callable[[list[CallRecord]], None]
) -> None:
    for slot in slots:
        if slot.dead or slot.actor is None:
            continue
        try:
            fold(await slot.actor.close.remote())
        except Exception as exc:
            log.warning("a Ray worker did not close cleanly", worker=slot.name, error=str(exc))
        ray.kill(slot.actor)


def _log_level() -> str:
    import logging

    return logging.getLevelName(logging.getLogger().getEffectiveLevel())


def _tell(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@hookimpl
def vkr_register_backends(register: Callable[[Backend], None]) -> None:
    register(RayExecutor())
