"""One model call: provider plugin, tenacity retries, vkr's own diskcache cache, a CallRecord.

The cache key is a signature of everything that changes the answer (model, api_base,
prompt version, messages with images by content hash, sampling parameters, sample index)
and nothing that does not (concurrency, batch size, API key). Frames are hashed once when
they are encoded, so building a key never touches image bytes.

Every request also reports to the run's model health (vkr_core.health): a model that stops
answering is cooled down, its calls go to another model or wait for it.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
)

from vkr_core.backends import CallCache
from vkr_core.config import ModelSpec
from vkr_core.health import ModelHealth, Route, route_for
from vkr_core.limits import ModelLimiter, SpendLimit
from vkr_core.log import get_logger, redact
from vkr_core.schemas import CallRecord, DiskFull, Frame, VkrError, is_disk_full
from vkr_core.steps import ReplyError
from vkr_core.video import FrameImages

log = get_logger("vkr.calls")


class TransientError(VkrError):
    """A provider error worth retrying: rate limit, 5xx, timeout, connection reset."""

    def __init__(self, message: str, retry_after: float | None = None, status: int | None = None):
        super().__init__(message)
        self.retry_after = retry_after
        self.status = status


class PermanentError(VkrError):
    """A provider error that retrying cannot fix: 4xx, bad credentials, unknown model."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


# Refusals that concern every request to the model, not this one: the key or the model name.
MODEL_DOWN_STATUSES = frozenset({401, 403, 404})


class CallFailed(VkrError):
    """A call that did not get a reply after its retries: the video fails and can be rerun.

    Unlike a malformed reply or a refusal this says nothing about the example, so it is
    never recorded as a rejection.
    """


class ModelUnavailable(CallFailed):
    """The call's model is cooled down and another model can take the instance: the step
    runs again and the router picks that one."""


class _Recheck(Exception):
    """The model's breaker opened under this call: ask the health again before retrying."""


@dataclass
class _Waiting:
    """One call's pause: whether it has waited, and since when another model answers."""

    paused: bool = False
    others_back: float | None = None


@dataclass
class ProviderReply:
    text: str
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float | None = None
    refusal: bool = False
    # Replayed from the journal: paid for by a run that died before recording it.
    recovered: bool = False


class Journal:
    """Raw replies saved the moment they arrive, before any parsing, keyed by the call's key.

    A run killed between a provider's answer and the cache write would otherwise pay for
    that answer again; a provider that supports the journal saves the raw body as soon as it
    is read and replays it on the next attempt of the same call.
    """

    PREFIX = "raw:"

    def __init__(self, cache: CallCache):
        self.cache = cache

    def save(self, key: str, raw: bytes) -> None:
        self.cache.set(self.PREFIX + key, raw)

    def load(self, key: str) -> bytes | None:
        value = self.cache.get(self.PREFIX + key)
        return value if isinstance(value, bytes) else None

    def drop(self, key: str) -> None:
        self.cache.delete(self.PREFIX + key)


CALL_KEY_HEADER = "X-Vkr-Call"
STEP_HEADER = "X-Vkr-Step"


class Provider:
    """Answers one chat request. Providers translate their errors into Transient/Permanent."""

    async def aclose(self) -> None:
        """Release connections; called when a run ends."""

    def warm_up(self, specs: Sequence[ModelSpec] = ()) -> None:
        """Start slow set-up (say, a heavy import) for these models in the background; must
        not block.

        Called when a run opens, so the first call does not wait for it, nor stop the event
        loop while it runs.
        """

    def check_entry(self, spec: ModelSpec) -> None:
        """Raise InputError when the pool entry is wrong for this provider (its ``options``).

        Called when a run opens, before its directory is written, so a fixed pool resumes it.
        """

    def use_folder(self, folder: Path) -> None:
        """A folder of the run the provider may keep files in (a server's log), made when
        needed; called before ``warm_up``."""

    async def wait_ready(self, spec: ModelSpec) -> None:
        """Return once the model can take requests; raise VkrError when it never will.

        A server the provider starts itself may need minutes: preflight waits here, outside
        its own timeout. The default is ready at once.
        """

    name: str = ""
    # True when ``complete`` accepts ``journal=`` and replays a journalled raw reply.
    supports_journal: bool = False

    def journals(self, spec: ModelSpec) -> bool:
        """Whether calls to this model get ``journal=`` (a provider may journal some models
        and not others)."""
        return self.supports_journal

    async def complete(
        self,
        spec: ModelSpec,
        messages: list[dict[str, Any]],
        params: dict[str, Any],
        headers: dict[str, str],
    ) -> ProviderReply:
        raise NotImplementedError

    async def check(self, spec: ModelSpec) -> ProviderReply | None:
        """The cheapest request proving the model is reachable and takes the key (preflight).

        Raises like ``complete``. The default is a one-token completion, never cached; a
        provider with a free way (a model list) overrides it and returns None.
        """
        return await self.complete(
            spec,
            [{"role": "user", "content": "Reply with OK."}],
            {"max_tokens": 1},
            {STEP_HEADER: "preflight"},
        )


# What one image costs in tokens at the sizes vkr sends (a 768 px frame is ~765 tokens at
# OpenAI's rates); used only to pace requests under a tokens-per-minute limit.
TOKENS_PER_IMAGE = 765


def estimate_tokens(messages: list[dict[str, Any]], params: dict[str, Any]) -> int:
    chars = 0
    images = 0
    for message in messages:
        content = message["content"]
        if isinstance(content, str):
            chars += len(content)
            continue
        for part in content:
            if part.get("type") == "frame":
                images += 1
            else:
                chars += len(part.get("text", ""))
    return chars // 4 + images * TOKENS_PER_IMAGE + int(params.get("max_tokens") or 0)


def image_part(frame: Frame) -> dict[str, Any]:
    """A message part that refers to an encoded frame; expanded to a data URL only when sent."""
    return {"type": "frame", "sha256": frame.sha256, "path": frame.path}


def key_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Messages as they enter the cache key: frame parts by content hash only."""
    out = []
    for message in messages:
        content = message["content"]
        if isinstance(content, list):
            content = [
                {"type": "image", "sha256": p["sha256"]} if p.get("type") == "frame" else p
                for p in content
            ]
        out.append({"role": message["role"], "content": content})
    return out


def cache_key(
    spec: ModelSpec,
    step: str,
    prompt_version: str,
    messages: list[dict[str, Any]],
    params: dict[str, Any],
    sample: int,
) -> str:
    signature = {
        "provider": spec.provider,
        "model": spec.model,
        "api_base": spec.api_base,
        "step": step,
        "prompt_version": prompt_version,
        "messages": key_messages(messages),
        "params": {k: params[k] for k in sorted(params)},
        "sample": sample,
    }
    blob = json.dumps(signature, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()


@dataclass
class CallResult:
    text: str
    outcome: str
    record: CallRecord


@dataclass
class RetrySettings:
    attempts: int = 6
    initial: float = 0.5
    maximum: float = 30.0


def _delay(settings: RetrySettings, exc: BaseException | None, failures: int) -> float:
    """Seconds to wait before the next attempt after ``exc``."""
    if isinstance(exc, _Recheck):
        return 0.0  # the model health decides what happens next, at once
    retry_after = getattr(exc, "retry_after", None)
    if retry_after is not None:
        # The provider said when: wait that long, spread a little so a burst of callers
        # does not come back in the same millisecond.
        return float(retry_after) * random.uniform(1.0, 1.25)
    backoff = min(settings.maximum, settings.initial * 2 ** (max(1, failures) - 1))
    return random.uniform(0, backoff)  # full jitter: retries from many tasks spread out


def _wait(
    settings: RetrySettings, failures: Callable[[], int]
) -> Callable[[RetryCallState], float]:
    def wait(state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        return _delay(settings, exc, failures())

    return wait


@dataclass
class ModelCaller:
    """Makes model calls for a run: cache, retries, per-model concurrency, call records."""

    cache_dir: Path
    providers: dict[str, Provider]
    retry: RetrySettings = field(default_factory=RetrySettings)
    on_record: Callable[[CallRecord], None] | None = None
    images: FrameImages = field(default_factory=FrameImages)
    # Shared with the run's router: which models answer, which are cooled down.
    health: ModelHealth = field(default_factory=ModelHealth)
    # --max-spend: once reached no new request is sent (the ones in flight still land).
    budget: SpendLimit | None = None
    # The call cache (a backend's, vkr_core.backends); by default diskcache in cache_dir.
    cache: Any = None

    def __post_init__(self) -> None:
        if self.cache is None:
            from vkr_core.backends import DiskCallCache

            self.cache = DiskCallCache.open_dir(self.cache_dir)
        self.journal = Journal(self.cache)
        self.stopping = False
        self.in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self.limiters: dict[str, ModelLimiter] = {}
        self.records: list[CallRecord] = []

    def close(self) -> None:
        self.cache.close()

    async def aclose(self) -> None:
        """Close the providers' connections and the cache (the end of a run)."""
        for provider in self.providers.values():
            await provider.aclose()
        self.close()

    def limiter(self, spec: ModelSpec) -> ModelLimiter:
        limiter = self.limiters.get(spec.name)
        if limiter is None:
            limiter = ModelLimiter(spec.max_concurrency, spec.rpm, spec.tpm)
            self.limiters[spec.name] = limiter
        return limiter

    async def _send(
        self,
        provider: Provider,
        spec: ModelSpec,
        messages: list[dict[str, Any]],
        params: dict[str, Any],
        headers: dict[str, str],
    ) -> ProviderReply:
        kwargs: dict[str, Any] = {"journal": self.journal} if provider.journals(spec) else {}
        limiter = self.limiter(spec)
        await limiter.acquire(estimate_tokens(messages, params) if spec.tpm else 0)
        try:
            reply = await provider.complete(
                spec, self.images.expand(messages), params, headers, **kwargs
            )
        except TransientError as exc:
            await limiter.release(
                ok=False, rate_limited=exc.status == 429, retry_after=exc.retry_after
            )
            raise
        except BaseException:
            await limiter.release(ok=False)
            raise
        await limiter.release(ok=True)
        return reply

    def _emit(self, record: CallRecord) -> None:
        self.records.append(record)
        if self.budget is not None and not record.cache_hit:
            self.budget.add(record.cost_usd)
        if self.on_record:
            self.on_record(record)

    def holding(self) -> bool:
        """No new request may be sent: the run is stopping or its budget is spent."""
        return self.stopping or (self.budget is not None and self.budget.reached)

    async def _outside_flight(self, waiting: Any) -> Any:
        """Await something during which this call holds no paid reply (a backoff, a pause),
        so a stopping run does not wait for it."""
        self.in_flight -= 1
        if self.in_flight == 0:
            self._idle.set()
        try:
            return await waiting
        finally:
            self.in_flight += 1
            self._idle.clear()

    async def _rest(self, seconds: float) -> None:
        if seconds > 0:
            await self._outside_flight(asyncio.sleep(seconds))

    async def _admit(
        self, spec: ModelSpec, step: str, route: Route | None, waiting: _Waiting
    ) -> bool:
        """Wait until a request may go to the model; True when it goes as the breaker's probe.

        Raises ModelUnavailable when the model is cooled down and the instance can go to a
        model that answers (or was not routed by a step, so nothing would wait for it).
        """
        while True:
            if self.holding():
                # A request not yet sent costs nothing: never send it; the run ends once the
                # calls in flight have landed (see drain).
                await self._outside_flight(asyncio.Event().wait())
            decision = self.health.admit(spec.name)
            if decision == "go":
                return False
            if decision == "probe":
                return True
            elsewhere = (
                route is not None
                and not route.fixed
                and any(self.health.answering(m) for m in route.candidates if m != spec.name)
            )
            if elsewhere and waiting.paused:
                # Rerouting costs the step's one retry, so a paused call keeps waiting while
                # its own model may come back with the others; it moves only once its model
                # has failed again after another one started answering.
                if waiting.others_back is None:
                    waiting.others_back = self.health.clock()
                    elsewhere = False
                else:
                    elsewhere = self.health.failed_since(spec.name, waiting.others_back)
            if decision == "excluded" or route is None or elsewhere:
                raise ModelUnavailable(
                    f"{step} call to {spec.name} not sent: {self.health.describe(spec.name)}"
                    + ("; another model takes it" if elsewhere else "")
                )
            waiting.paused = True
            self.health.note_pause(spec.name, step)
            await self._outside_flight(self.health.wait(spec.name))

    async def call(
        self,
        *,
        spec: ModelSpec,
        step: str,
        prompt_version: str,
        messages: list[dict[str, Any]],
        params: dict[str, Any],
        sample: int = 0,
        video_id: str | None = None,
        validate: Callable[[str], Any] | None = None,
    ) -> CallResult:
        """Call once (or replay from cache). Raises ReplyError on refusal, CallFailed on no reply."""
        key = cache_key(spec, step, prompt_version, messages, params, sample)
        started = time.perf_counter()
        hit = self.cache.get(key)
        if hit is not None:
            record = CallRecord(
                step=step,
                model=spec.name,
                video_id=video_id,
                cache_key=key,
                latency_s=time.perf_counter() - started,
                prompt_tokens=hit["prompt_tokens"],
                completion_tokens=hit["completion_tokens"],
                cost_usd=hit["cost_usd"],
                cache_hit=True,
                attempts=0,
                outcome=hit["outcome"],
                structured_output="response_format" in params,
            )
            self._emit(record)
            return CallResult(hit["text"], hit["outcome"], record)

        if self.holding():
            # A request cancelled mid-flight is still billed by the provider, so a stopping
            # run never cancels one: new calls wait here for the run to be cancelled, which
            # happens once every call in flight has landed in the cache (see drain).
            await asyncio.Event().wait()
        # Counted until the reply is in the cache, so a stopping run knows when nothing paid
        # for can be lost any more.
        self.in_flight += 1
        self._idle.clear()
        try:
            return await self._call_uncached(
                spec=spec,
                step=step,
                key=key,
                messages=messages,
                params=params,
                sample=sample,
                video_id=video_id,
                validate=validate,
                started=started,
            )
        finally:
            self.in_flight -= 1
            if self.in_flight == 0:
                self._idle.set()

    async def drain(self) -> None:
        """Return once no call is between being sent and being cached."""
        await self._idle.wait()

    async def _call_uncached(
        self,
        *,
        spec: ModelSpec,
        step: str,
        key: str,
        messages: list[dict[str, Any]],
        params: dict[str, Any],
        sample: int,
        video_id: str | None,
        validate: Callable[[str], Any] | None,
        started: float,
    ) -> CallResult:
        provider = self.providers.get(spec.provider)
        if provider is None:
            raise VkrError(
                f"model {spec.name!r} names provider {spec.provider!r}, which no plugin registers"
            )
        # The step name and call key travel as headers: real providers ignore them, the fake
        # server reads the step, and the journal files raw replies under the key.
        headers = {STEP_HEADER: step, CALL_KEY_HEADER: key}
        send_params = dict(params, seed=sample) if "seed" not in params else dict(params)
        route = route_for(step, spec.name)
        since = time.monotonic()
        waiting = _Waiting()
        attempts = 0  # requests sent
        failures = 0  # failed requests counted against the retry budget
        health = self.health

        async def attempt_once() -> ProviderReply:
            nonlocal attempts, failures
            probe = await self._admit(spec, step, route, waiting)
            attempts += 1
            try:
                reply = await self._send(provider, spec, messages, send_params, headers)
            except TransientError as exc:
                if is_disk_full(exc):
                    # Our disk, not the model: the journal could not keep the reply. Stop
                    # the run (it resumes after space is freed); never cool the model down.
                    if probe:
                        health.abandon_probe(spec.name)
                    raise DiskFull(f"no space left to keep a reply: {redact(str(exc))}") from exc
                if exc.status == 429:  # busy, not down: the limiter slows down, health is fine
                    health.alive(spec.name, probe)
                    failures += 1
                    raise
                reason = redact(str(exc))
                health.failed(spec.name, reason, probe=probe, definitive=False)
                if probe:
                    raise _Recheck(reason) from None  # cooled again: wait or go elsewhere
                failures += 1
                if failures >= self.retry.attempts:
                    health.gave_up(spec.name, reason, since)
                    if route is not None and health.is_open(spec.name):
                        raise _Recheck(reason) from None
                raise
            except PermanentError as exc:
                if exc.status in MODEL_DOWN_STATUSES:
                    health.failed(spec.name, redact(str(exc)), probe=probe, definitive=True)
                    if route is not None:
                        raise _Recheck(str(exc)) from None
                else:
                    health.alive(spec.name, probe)  # it answered: the request was wrong
                raise
            except BaseException:
                if probe:
                    health.abandon_probe(spec.name)
                raise
            health.alive(spec.name, probe)
            return reply

        def spent(exc: BaseException | None) -> bool:
            return not isinstance(exc, _Recheck) and failures >= self.retry.attempts

        def stop(state: RetryCallState) -> bool:
            return spent(state.outcome.exception() if state.outcome else None)

        try:
            try:
                # Most calls succeed at once: the first attempt is made without tenacity's
                # machinery (~3 % of the event loop's time per call); the retries go through it.
                reply = await attempt_once()
            except (TransientError, _Recheck) as first:
                if spent(first):
                    raise
                await self._rest(_delay(self.retry, first, failures))
                async for attempt in AsyncRetrying(
                    stop=stop,
                    wait=_wait(self.retry, lambda: failures),
                    retry=retry_if_exception_type((TransientError, _Recheck)),
                    sleep=self._rest,
                    reraise=True,
                ):
                    with attempt:
                        reply = await attempt_once()
        except (ModelUnavailable, TransientError, PermanentError) as exc:
            reason = redact(str(exc))
            # A call that gave up on its model: recorded once it sent something (a reroute
            # before any request is no call), then handed on for the node to reroute or fail.
            if attempts or not isinstance(exc, ModelUnavailable):
                self._emit(
                    CallRecord(
                        step=step,
                        model=spec.name,
                        video_id=video_id,
                        cache_key=key,
                        latency_s=time.perf_counter() - started,
                        cache_hit=False,
                        attempts=attempts,
                        outcome="error",
                        error=reason,
                        rerouted_from=route.rerouted_from if route else None,
                        structured_output="response_format" in params,
                    )
                )
            if isinstance(exc, ModelUnavailable):
                raise
            raise CallFailed(
                f"{step} call to {spec.name} failed after {attempts} attempt(s): {reason}"
            ) from None

        latency = time.perf_counter() - started
        cost = reply.cost_usd
        if cost is None:
            cost = (spec.input_cost_per_token or 0.0) * reply.prompt_tokens + (
                spec.output_cost_per_token or 0.0
            ) * reply.completion_tokens
        base: dict[str, Any] = dict(
            step=step,
            model=spec.name,
            video_id=video_id,
            cache_key=key,
            latency_s=latency,
            prompt_tokens=reply.prompt_tokens,
            completion_tokens=reply.completion_tokens,
            cost_usd=cost,
            cache_hit=False,
            # A reply replayed from the journal was paid by a run that died before recording
            # it: counted (once) here, but no request was sent now.
            attempts=0 if reply.recovered else attempts,
            rerouted_from=route.rerouted_from if route else None,
            structured_output="response_format" in params,
        )
        if reply.refusal:
            # A refusal is terminal and never cached: it says nothing about the next request.
            self.journal.drop(key)
            self._emit(CallRecord(**base, outcome="refusal", error="refused"))
            raise ReplyError("refusal", f"{spec.name} refused ({reply.finish_reason})", reply.text)

        outcome: Literal["ok", "malformed"] = "ok"
        if validate is not None:
            try:
                validate(reply.text)
            except ReplyError:
                outcome = "malformed"
        # A malformed reply is cached as malformed: replaying it costs nothing and gives the
        # same rejection, so a rerun never pays for it twice.
        with self.cache.transact():  # one SQLite commit for the entry and the journal
            self._store(key, reply, outcome, cost, spec)
        record = CallRecord(**base, outcome=outcome)
        self._emit(record)
        return CallResult(reply.text, outcome, record)

    def _store(
        self, key: str, reply: ProviderReply, outcome: str, cost: float, spec: ModelSpec
    ) -> None:
        self.cache.set(
            key,
            {
                "text": reply.text,
                "outcome": outcome,
                "prompt_tokens": reply.prompt_tokens,
                "completion_tokens": reply.completion_tokens,
                "cost_usd": cost,
                "model": spec.name,
            },
        )
        self.journal.drop(key)
