"""One model call: provider plugin, tenacity retries, vkr's own diskcache cache, a CallRecord.

The cache key is a signature of everything that changes the answer (model, api_base,
prompt version, messages with images by content hash, sampling parameters, sample index)
and nothing that does not (concurrency, batch size, API key). Frames are hashed once when
they are encoded, so building a key never touches image bytes.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import diskcache
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_after_attempt,
)

from vkr_core.config import ModelSpec
from vkr_core.limits import ModelLimiter
from vkr_core.log import get_logger, redact
from vkr_core.schemas import CallRecord, Frame, VkrError
from vkr_core.steps import ReplyError
from vkr_core.video import FrameImages

log = get_logger("vkr.calls")

# Never evict: an evicted entry is a call paid twice. diskcache's default is 1 GB, evicting.
CACHE_SIZE_LIMIT = 2**60


class TransientError(VkrError):
    """A provider error worth retrying: rate limit, 5xx, timeout, connection reset."""

    def __init__(self, message: str, retry_after: float | None = None, status: int | None = None):
        super().__init__(message)
        self.retry_after = retry_after
        self.status = status


class PermanentError(VkrError):
    """A provider error that retrying cannot fix: 4xx, bad credentials, unknown model."""


class CallFailed(VkrError):
    """A call that did not get a reply after its retries: the video fails and can be rerun.

    Unlike a malformed reply or a refusal this says nothing about the example, so it is
    never recorded as a rejection.
    """


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

    def __init__(self, cache: diskcache.Cache):
        self.cache = cache

    def save(self, key: str, raw: bytes) -> None:
        self.cache.set(self.PREFIX + key, raw)

    def load(self, key: str) -> bytes | None:
        value = self.cache.get(self.PREFIX + key)
        return value if isinstance(value, bytes) else None

    def drop(self, key: str) -> None:
        self.cache.delete(self.PREFIX + key)


CALL_KEY_HEADER = "X-Vkr-Call"


class Provider:
    """Answers one chat request. Providers translate their errors into Transient/Permanent."""

    async def aclose(self) -> None:
        """Release connections; called when a run ends."""

    name: str = ""
    # True when ``complete`` accepts ``journal=`` and replays a journalled raw reply.
    supports_journal: bool = False

    async def complete(
        self,
        spec: ModelSpec,
        messages: list[dict[str, Any]],
        params: dict[str, Any],
        headers: dict[str, str],
    ) -> ProviderReply:
        raise NotImplementedError


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


def _wait(settings: RetrySettings) -> Callable[[RetryCallState], float]:
    def wait(state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        retry_after = getattr(exc, "retry_after", None)
        if retry_after is not None:
            # The provider said when: wait that long, spread a little so a burst of callers
            # does not come back in the same millisecond.
            return float(retry_after) * random.uniform(1.0, 1.25)
        backoff = min(settings.maximum, settings.initial * 2 ** (state.attempt_number - 1))
        return random.uniform(0, backoff)  # full jitter: retries from many tasks spread out

    return wait


@dataclass
class ModelCaller:
    """Makes model calls for a run: cache, retries, per-model concurrency, call records."""

    cache_dir: Path
    providers: dict[str, Provider]
    retry: RetrySettings = field(default_factory=RetrySettings)
    on_record: Callable[[CallRecord], None] | None = None
    images: FrameImages = field(default_factory=FrameImages)

    def __post_init__(self) -> None:
        self.cache = diskcache.Cache(
            str(self.cache_dir), size_limit=CACHE_SIZE_LIMIT, eviction_policy="none"
        )
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
        kwargs: dict[str, Any] = {"journal": self.journal} if provider.supports_journal else {}
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
        if self.on_record:
            self.on_record(record)

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
            )
            self._emit(record)
            return CallResult(hit["text"], hit["outcome"], record)

        if self.stopping:
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
        attempts = 0
        # The step name and call key travel as headers: real providers ignore them, the fake
        # server reads the step, and the journal files raw replies under the key.
        headers = {"X-Vkr-Step": step, CALL_KEY_HEADER: key}
        send_params = dict(params, seed=sample) if "seed" not in params else dict(params)
        try:
            async for attempt in AsyncRetrying(
                stop=stop_after_attempt(self.retry.attempts),
                wait=_wait(self.retry),
                retry=retry_if_exception_type(TransientError),
                reraise=True,
            ):
                with attempt:
                    attempts += 1
                    reply = await self._send(provider, spec, messages, send_params, headers)
        except (TransientError, PermanentError) as exc:
            reason = redact(str(exc))
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
                )
            )
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
