"""The default model provider: any model litellm speaks to (OpenAI, Anthropic, Gemini, vLLM ...)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import importlib
import json
import os
import re
import secrets
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from vkr_core.calls import (
    CALL_KEY_HEADER,
    Journal,
    PermanentError,
    Provider,
    ProviderReply,
    TransientError,
)
from vkr_core.config import ModelSpec
from vkr_core.hookspecs import hookimpl
from vkr_core.log import get_logger, redact, register_secrets
from vkr_core.schemas import InputError
from vkr_core.video import DataURL

if TYPE_CHECKING:
    from plugins.providers.journal_transport import JournallingTransport

log = get_logger("vkr.providers.litellm")

_litellm: Any = None
_import_lock = threading.Lock()  # held for the whole import
_start_lock = threading.Lock()  # held only to start a thread: never blocks the loop
_imports: dict[str, concurrent.futures.Future[Any]] = {}  # module name -> its import


# Marks where an image's data URL goes back into an encoded body: random per process, so
# no text a step sends can spell it.
_IMAGE_SLOT = f"vkr-image-{secrets.token_hex(8)}-"


def json_body(body: dict[str, Any]) -> bytes:
    """``json.dumps(body)`` as bytes, without passing the frames' base64 through the encoder.

    A request carries its frames as data URLs (hundreds of KB of base64 per call); the JSON
    encoder scans every character of them for escapes. vkr's own (``DataURL``, made from the
    frame's bytes) need none, so they are cut out, the rest encoded, and they are spliced
    back: the bytes are the same as ``json.dumps`` gives.
    """
    urls: list[str] = []

    def cut(part: Any) -> Any:
        if isinstance(part, dict) and part.get("type") == "image_url":
            image = part.get("image_url")
            url = image.get("url") if isinstance(image, dict) else None
            if isinstance(image, dict) and isinstance(url, DataURL):
                urls.append(url)
                return {**part, "image_url": {**image, "url": f"{_IMAGE_SLOT}{len(urls) - 1}"}}
        return part

    # Frames are parts of a message's content (FrameImages.expand): only those lists are
    # copied, not every dict and list of the body (8 us less a call).
    messages = body.get("messages")
    if isinstance(messages, list):
        body = {
            **body,
            "messages": [
                {**m, "content": [cut(p) for p in m["content"]]}
                if isinstance(m, dict) and isinstance(m.get("content"), list)
                else m
                for m in messages
            ],
        }
    text = json.dumps(body)
    if not urls:
        return text.encode()
    pieces = text.split(f'"{_IMAGE_SLOT}')
    out = [pieces[0]]
    for piece in pieces[1:]:
        index, rest = piece.split('"', 1)
        out.append(f'"{urls[int(index)]}"{rest}')
    return "".join(out).encode()


def _env_proxy(url: str) -> str | None:
    """The proxy HTTP(S)_PROXY / NO_PROXY give for ``url``, as litellm's transport reads them."""
    import urllib.parse
    import urllib.request

    parts = urllib.parse.urlsplit(url)
    if parts.hostname and urllib.request.proxy_bypass(parts.hostname):
        return None
    return urllib.request.getproxies().get(parts.scheme)


def _import_litellm() -> Any:
    """Import litellm (slow: seconds); it fetches a cost map unless told not to."""
    global _litellm
    with _import_lock:  # one import, whether from the warm-up thread or a caller
        if _litellm is None:
            os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
            if os.environ.get("LITELLM_LOG") == "":
                del os.environ["LITELLM_LOG"]  # an empty value makes the import fail
            import litellm

            litellm.drop_params = True  # a provider without `seed` support must not fail
            litellm.suppress_debug_info = True
            litellm.redact_messages_in_exceptions = True
            litellm.turn_off_message_logging = True
            litellm.telemetry = False
            _litellm = litellm
    return _litellm


def _import_in_thread(name: str, load: Callable[[], Any]) -> concurrent.futures.Future[Any]:
    """``load`` (the import of ``name``) run once per process, in a thread of its own; the
    future every caller waits on."""
    with _start_lock:
        future = _imports.get(name)
        if future is None:
            future = _imports[name] = concurrent.futures.Future()

            def target() -> None:
                try:
                    future.set_result(load())
                except BaseException as exc:  # the callers that await it see the error
                    future.set_exception(exc)

            threading.Thread(target=target, name=f"vkr-import-{name}", daemon=True).start()
    return future


async def _imported(name: str, load: Callable[[], Any]) -> Any:
    """The module, imported off the event loop: an import on the loop stops every call and
    decode of the run while it lasts."""
    future = _import_in_thread(name, load)
    if future.done():
        return future.result()
    return await asyncio.wrap_future(future)


def _start_import() -> concurrent.futures.Future[Any]:
    """litellm's import (~5 s) started in the background."""
    return _import_in_thread("litellm", _import_litellm)


async def _litellm_module() -> Any:
    if _litellm is not None:
        return _litellm
    return await _imported("litellm", _import_litellm)


async def _aiohttp_module() -> Any:
    """aiohttp (~0.2 s), imported on the first call: a finished run never imports it."""
    return await _imported("aiohttp", lambda: importlib.import_module("aiohttp"))


# Sampling parameters every OpenAI-compatible server takes as they are: a request with only
# these needs nothing of litellm's parameter mapping (see LitellmProvider._complete_plain).
PLAIN_PARAMS = frozenset(
    {
        "temperature",
        "top_p",
        "max_tokens",
        "seed",
        "stop",
        "n",
        "presence_penalty",
        "frequency_penalty",
        "response_format",
        "logprobs",
        "top_logprobs",
    }
)
# litellm routes that, for a model its map does not mark supports_response_schema, turn the
# schema into a user message instead of sending it (litellm 1.110.2: the Gemini/Vertex
# request transformation; Z.ai's and BigModel's prompts_unsupported_json_schema): structured
# output there would not be what it says.
SCHEMA_TO_PROMPT_ROUTES = frozenset({"gemini", "vertex_ai", "vertex_ai_beta", "zai", "bigmodel"})
# Statuses litellm maps to its retryable errors (timeouts, conflicts, rate limits; and 5xx).
TRANSIENT_STATUSES = frozenset({408, 409, 429})


def _plain_route(spec: ModelSpec) -> bool:
    """An OpenAI-compatible server the pool names by address (vLLM, the fake server)."""
    return spec.model.startswith("openai/") and bool(spec.api_base)


# litellm routes that post through the ``client=`` vkr hands them (read in litellm 1.110.2:
# the OpenAI SDK route takes an ``AsyncOpenAI``; AnthropicChatCompletion, the Gemini route and
# base_llm_http_handler, which serves DeepSeek and hosted vLLM, take an ``AsyncHTTPHandler``);
# other routes build their own client and cannot be journalled.
_JOURNAL_ROUTES = {
    "openai/": "openai",
    "anthropic/": "anthropic",
    "gemini/": "gemini",
    "deepseek/": "deepseek",
    "hosted_vllm/": "hosted_vllm",
}


def _journal_route(spec: ModelSpec) -> str | None:
    """The journalled litellm route a model goes through, or None."""
    for prefix, route in _JOURNAL_ROUTES.items():
        if spec.model.startswith(prefix):
            return route
    return None


def _pool_priced(spec: ModelSpec) -> bool:
    return spec.input_cost_per_token is not None or spec.output_cost_per_token is not None


def _retry_after(exc: Any) -> float | None:
    """Seconds the provider asked to wait: OpenAI's retry-after-ms, else Retry-After (from an
    error carrying a response or litellm's copy of its headers, or a response), else Gemini's
    ``RetryInfo.retryDelay`` in the error body."""
    sources = [getattr(exc, "litellm_response_headers", None)]
    sources.append(getattr(getattr(exc, "response", exc), "headers", None))
    for headers in sources:
        if not headers or not hasattr(headers, "get"):
            continue
        for name, scale in (("retry-after-ms", 1000.0), ("retry-after", 1.0)):
            value = headers.get(name)
            if value is None:
                continue
            try:
                return float(value) / scale
            except ValueError:
                continue  # an HTTP date: fall back to backoff
    # Gemini says it only in the body (google.rpc.RetryInfo, a Duration such as "3s" or
    # "0.5s"), which litellm keeps in the error's message.
    match = _RETRY_DELAY.search(str(getattr(exc, "message", None) or exc))
    if match:
        return float(match.group(1))
    return None


_RETRY_DELAY = re.compile(r'"retryDelay"\s*:\s*"(\d+(?:\.\d+)?)s"')


def _litellm_cost(litellm: Any, model: str, prompt_tokens: int, completion_tokens: int) -> float:
    try:
        prompt_cost, completion_cost = litellm.cost_per_token(
            model=model, prompt_tokens=prompt_tokens, completion_tokens=completion_tokens
        )
        return float(prompt_cost + completion_cost)
    except Exception:
        return 0.0  # a model missing from litellm's price map


def _token_prices(litellm: Any, model: str) -> tuple[float, float] | None:
    """A model's (input, output) price per token from litellm's cost map, or None when its
    price is not linear in the tokens (tiers above a context size, discounts): litellm then
    prices each call itself."""
    try:
        info = litellm.get_model_info(model)
    except Exception:
        return (0.0, 0.0)  # not in the map: litellm prices it at 0 as well
    if any("_above_" in key and value for key, value in info.items()):
        return None
    prices = (info.get("input_cost_per_token"), info.get("output_cost_per_token"))
    if prices[0] is None or prices[1] is None:
        return None
    linear = (float(prices[0]), float(prices[1]))
    # Checked once against litellm's own answer, so a cost-map shape this code does not
    # know never makes vkr's price differ from litellm's.
    expected = _litellm_cost(litellm, model, 1000, 1000)
    if abs(1000 * linear[0] + 1000 * linear[1] - expected) > 1e-12 * max(1.0, expected):
        return None
    return linear


def reply_from_openai_body(raw: bytes) -> tuple[str, str | None, int, int, bool]:
    """Text, finish reason, token counts and refusal flag of an OpenAI chat.completion body."""
    data = json.loads(raw)
    choice = data["choices"][0]
    message = choice.get("message") or {}
    usage = data.get("usage") or {}
    refusal = message.get("refusal")
    finish = choice.get("finish_reason")
    text = message.get("content") or refusal or ""
    return (
        text,
        finish,
        int(usage.get("prompt_tokens") or 0),
        int(usage.get("completion_tokens") or 0),
        finish == "content_filter" or bool(refusal),
    )


class LitellmProvider(Provider):
    name = "litellm"
    supports_journal = True

    def __init__(self) -> None:
        self._clients: dict[tuple[Any, ...], tuple[Any, JournallingTransport]] = {}
        self._unjournalled: set[str] = set()
        self._sessions: dict[tuple[Any, ...], Any] = {}
        # model -> (input, output) price per token, looked up once: litellm's per-call cost
        # calculation is a third of its CPU per call.
        self._prices: dict[str, tuple[float, float] | None] = {}

    def check_entry(self, spec: ModelSpec) -> None:
        """Refuse ``structured_output: true`` where litellm would drop the schema: with
        drop_params on, it silently leaves out a parameter its route for the model lacks."""
        if not spec.structured_output or _plain_route(spec):
            return  # an OpenAI-compatible server gets response_format as is
        litellm = _import_litellm()
        try:
            model, route, _, _ = litellm.get_llm_provider(spec.model, api_base=spec.api_base)
            supported = litellm.get_supported_openai_params(model=model, custom_llm_provider=route)
        except Exception as exc:  # litellm does not know the model's route at all
            raise InputError(
                f"model {spec.name!r} has structured_output: true, but litellm cannot tell "
                f"how to send a response schema to {spec.model!r}: "
                + " ".join(redact(str(exc)).split())[:200]
            ) from None
        if "response_format" not in (supported or []):
            raise InputError(
                f"model {spec.name!r} has structured_output: true, but litellm's {route} route "
                f"for {spec.model!r} takes no response schema and would drop it: set "
                "structured_output: false for this model"
            )
        if route in SCHEMA_TO_PROMPT_ROUTES and not litellm.supports_response_schema(
            model=model, custom_llm_provider=route
        ):
            raise InputError(
                f"model {spec.name!r} has structured_output: true, but litellm does not list "
                f"{spec.model!r} as taking a response schema, and its {route} route then puts "
                "the schema into the prompt instead of sending it: name a model litellm lists "
                "(e.g. a dated release), or set structured_output: false for this model"
            )

    def warm_up(self, specs: Sequence[ModelSpec] = ()) -> None:
        # Only when a model needs it: the import is ~5 s of CPU holding the GIL against the
        # run's own work, and a pool of priced OpenAI-compatible servers never needs it.
        if any(not (_plain_route(spec) and _pool_priced(spec)) for spec in specs):
            _start_import()

    async def _price(
        self, spec: ModelSpec, prompt_tokens: int, completion_tokens: int
    ) -> float | None:
        if _pool_priced(spec):
            return None  # ModelCaller applies the pool's prices
        return self._cost(await _litellm_module(), spec, prompt_tokens, completion_tokens)

    def _cost(
        self, litellm: Any, spec: ModelSpec, prompt_tokens: int, completion_tokens: int
    ) -> float | None:
        """The call's price from litellm's cost map, or None when the pool sets its own prices."""
        if _pool_priced(spec):
            return None
        if spec.model not in self._prices:
            self._prices[spec.model] = _token_prices(litellm, spec.model)
        prices = self._prices[spec.model]
        if prices is None:
            return _litellm_cost(litellm, spec.model, prompt_tokens, completion_tokens)
        return prices[0] * prompt_tokens + prices[1] * completion_tokens

    async def aclose(self) -> None:
        """Close the HTTP clients this provider opened (at the end of a run)."""
        clients, self._clients = list(self._clients.values()), {}
        for client, _ in clients:
            await client.close()
        sessions = [session for session, _ in self._sessions.values()]
        self._sessions = {}
        for session in sessions:
            await session.close()

    def _journalling_client(
        self, spec: ModelSpec, api_key: str | None, journal: Journal
    ) -> tuple[Any, JournallingTransport]:
        """A client for ``litellm.acompletion(client=...)`` whose HTTP layer is the journalling
        transport: an OpenAI SDK client for ``openai/...`` models, litellm's own handler for
        the Anthropic and Gemini routes (both post through the ``client`` they are given)."""
        # A client belongs to the event loop it was made in: a caller used from a second
        # asyncio.run must not get the first loop's (closed) connections.
        loop = asyncio.get_running_loop()
        route = _journal_route(spec)
        key: tuple[Any, ...] = (route, spec.timeout, id(journal), id(loop))
        if route == "openai":
            key += (spec.api_base, api_key)
        entry = self._clients.get(key)
        if entry is None:
            import httpx

            from plugins.providers.journal_transport import JournallingTransport

            transport = JournallingTransport(journal)
            client: Any
            if route == "openai":
                from openai import AsyncOpenAI

                # openai 3.x types its client as httpx2's; litellm hands it httpx clients too.
                http_client: Any = httpx.AsyncClient(
                    transport=transport, timeout=spec.timeout, follow_redirects=True
                )
                client = AsyncOpenAI(
                    api_key=api_key,
                    base_url=spec.api_base,
                    http_client=http_client,
                    max_retries=0,
                    timeout=spec.timeout,
                )
            else:
                from litellm.llms.custom_httpx.http_handler import AsyncHTTPHandler

                client = AsyncHTTPHandler(timeout=spec.timeout, transport=transport)
            entry = self._clients[key] = (client, transport)
        return entry

    async def wait_ready(self, spec: ModelSpec) -> None:
        # Preflight reaches Anthropic, Gemini and other non-OpenAI models through litellm:
        # its import (seconds, tens on a loaded machine) is not the model's time to answer,
        # so it must not count against the reach timeout.
        if not spec.model.startswith("openai/"):
            await _litellm_module()

    def journals(self, spec: ModelSpec) -> bool:
        """Whether a reply from this model is journalled: only where litellm's route posts
        through the client vkr hands it (OpenAI-compatible, Anthropic, Gemini)."""
        if _journal_route(spec) is not None:
            return True
        if spec.model not in self._unjournalled:
            self._unjournalled.add(spec.model)
            log.warning(
                "replies not journalled",
                model=spec.name,
                why="litellm's route for this provider does not take vkr's HTTP client: a "
                "reply read just before a kill -9 is paid again on resume",
            )
        return False

    async def complete(
        self,
        spec: ModelSpec,
        messages: list[dict[str, Any]],
        params: dict[str, Any],
        headers: dict[str, str],
        journal: Journal | None = None,
    ) -> ProviderReply:
        call_key = headers.get(CALL_KEY_HEADER)
        plain = journal is not None and _plain_route(spec) and set(params) <= PLAIN_PARAMS
        if plain and journal is not None and call_key:
            raw = journal.load(call_key)
            if raw is not None:
                text, finish, prompt_tokens, completion_tokens, refusal = reply_from_openai_body(
                    raw
                )
                return ProviderReply(
                    text=text,
                    finish_reason=finish,
                    prompt_tokens=prompt_tokens,
                    completion_tokens=completion_tokens,
                    refusal=refusal,
                    recovered=True,
                    cost_usd=await self._price(spec, prompt_tokens, completion_tokens),
                )
        api_key = spec.api_key()
        register_secrets([api_key])
        if api_key is None and spec.api_base:
            # Local OpenAI-compatible servers (vLLM, the fake server) need no key, but the
            # OpenAI client refuses to send a request without one: vLLM's convention.
            api_key = "EMPTY"
        if plain and journal is not None:
            return await self._complete_plain(spec, messages, params, headers, api_key, journal)
        litellm = await _litellm_module()
        extra: dict[str, Any] = {}
        transport: JournallingTransport | None = None
        if journal is not None and _journal_route(spec) is not None:
            extra["client"], transport = self._journalling_client(spec, api_key, journal)
        try:
            response, recovered = await self._acompletion(
                litellm,
                transport,
                call_key,
                model=spec.model,
                messages=messages,
                api_base=spec.api_base,
                api_key=api_key,
                timeout=spec.timeout,
                extra_headers=headers,
                # tenacity in vkr_core.calls owns retries; litellm's and the SDK's would
                # multiply attempts and hide 429s from the adaptive limiter.
                num_retries=0,
                max_retries=0,
                **extra,
                **params,
            )
        except (
            litellm.RateLimitError,
            litellm.Timeout,
            litellm.APIConnectionError,
            litellm.InternalServerError,
            litellm.ServiceUnavailableError,
            litellm.BadGatewayError,
        ) as exc:
            status = getattr(exc, "status_code", None)
            raise TransientError(
                f"{type(exc).__name__}: {redact(str(exc))[:300]}", _retry_after(exc), status
            ) from None
        except litellm.ContentPolicyViolationError as exc:
            return ProviderReply(
                text=redact(str(exc))[:500], finish_reason="content_filter", refusal=True
            )
        except Exception as exc:  # 4xx and everything else: retrying cannot help
            if journal is not None and call_key and getattr(exc, "vkr_recovered", False):
                journal.drop(call_key)  # a journalled body litellm cannot parse never will
            raise PermanentError(
                f"{type(exc).__name__}: {redact(str(exc))[:300]}",
                getattr(exc, "status_code", None),
            ) from None

        choice = response.choices[0]
        message = choice.message
        text = message.content or ""
        refusal_text = getattr(message, "refusal", None)
        finish = choice.finish_reason
        usage = getattr(response, "usage", None)
        prompt_tokens = int(getattr(usage, "prompt_tokens", 0) or 0)
        completion_tokens = int(getattr(usage, "completion_tokens", 0) or 0)
        refusal = finish == "content_filter" or bool(refusal_text)
        text = text or (refusal_text or "")
        if refusal and not text and journal is not None and call_key:
            # Gemini's SAFETY stop and a blocked prompt carry no text: the raw reply (kept
            # in the journal until the refusal is recorded) is what says why.
            raw = journal.load(call_key)
            if raw is not None:
                text = redact(raw.decode("utf-8", "replace"))[:2000]
        return ProviderReply(
            text=text,
            finish_reason=finish,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            cost_usd=self._cost(litellm, spec, prompt_tokens, completion_tokens),
            refusal=refusal,
            recovered=recovered,
        )

    @staticmethod
    async def _acompletion(
        litellm: Any, transport: JournallingTransport | None, call_key: str | None, **kwargs: Any
    ) -> tuple[Any, bool]:
        """``litellm.acompletion``'s reply, and whether the journalling transport answered it
        from the journal (an error raised is marked ``vkr_recovered`` the same way)."""
        try:
            response = await litellm.acompletion(**kwargs)
        except Exception as exc:
            recovered = transport is not None and transport.replayed(call_key)
            exc.vkr_recovered = recovered  # type: ignore[attr-defined]
            raise
        return response, transport is not None and transport.replayed(call_key)

    async def _complete_plain(
        self,
        spec: ModelSpec,
        messages: list[dict[str, Any]],
        params: dict[str, Any],
        headers: dict[str, str],
        api_key: str | None,
        journal: Journal,
    ) -> ProviderReply:
        """An OpenAI-compatible server (vLLM, the fake server) asked with parameters every
        such server takes: nothing for litellm to map, so the request is one POST and the
        body is read the way a journalled one is.

        Through ``litellm.acompletion`` the same request cost ~6 ms of CPU (cost
        calculation, logging payloads, redaction copies, the SDK's models), a plain POST
        ~0.3 ms; at a few hundred calls a second on one event loop that difference is the
        run's limit (docs/BENCHMARKS.md, throughput). Errors are sorted as litellm sorts
        them: timeouts, 408, 409, 429 and 5xx are retried, a content-policy 400 is a
        refusal, any other 4xx is permanent.
        """
        aiohttp = await _aiohttp_module()

        loop = asyncio.get_running_loop()
        key = (spec.api_base, api_key, spec.timeout, id(loop))
        url = str(spec.api_base).rstrip("/") + "/chat/completions"
        entry = self._sessions.get(key)
        if entry is None:
            session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=spec.timeout),
                connector=aiohttp.TCPConnector(limit=0),  # vkr's limiter bounds concurrency
                headers={"Authorization": f"Bearer {api_key}"} if api_key else None,
                # Not trust_env: it reads ~/.netrc and the proxy variables in a worker thread
                # on every request (two executor round trips per call, competing with the
                # frame decoders for the loop's threads). The proxy is looked up once here.
                trust_env=False,
            )
            entry = self._sessions[key] = (session, _env_proxy(url))
        session, proxy = entry
        body = {"model": spec.model.removeprefix("openai/"), "messages": messages, **params}
        try:
            async with session.post(
                url,
                data=json_body(body),
                headers={**headers, "Content-Type": "application/json"},
                proxy=proxy,
            ) as response:
                raw = await response.read()
                status = response.status
                retry_after = _retry_after(response)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise TransientError(f"{type(exc).__name__}: {redact(str(exc))[:300]}") from None
        if status == 200:
            call_key = headers.get(CALL_KEY_HEADER)
            if call_key:
                journal.save(call_key, raw)  # before parsing: a crash now costs nothing
            try:
                text, finish, prompt_tokens, completion_tokens, refusal = reply_from_openai_body(
                    raw
                )
            except (ValueError, KeyError, IndexError, TypeError, AttributeError) as exc:
                if call_key:
                    journal.drop(call_key)  # replaying it could only fail the same way
                raise PermanentError(
                    f"unreadable reply from {spec.name}: {type(exc).__name__}: "
                    f"{redact(str(exc))[:200]}"
                ) from None
            return ProviderReply(
                text=text,
                finish_reason=finish,
                prompt_tokens=prompt_tokens,
                completion_tokens=completion_tokens,
                cost_usd=await self._price(spec, prompt_tokens, completion_tokens),
                refusal=refusal,
            )
        detail = redact(raw.decode("utf-8", "replace"))[:300]
        message = f"HTTP {status} from {spec.name}: {detail}"
        if status in TRANSIENT_STATUSES or status >= 500:
            raise TransientError(message, retry_after, status)
        if status == 400 and ("content_policy" in detail or "content_filter" in detail):
            return ProviderReply(text=detail, finish_reason="content_filter", refusal=True)
        raise PermanentError(message, status)

    async def check(self, spec: ModelSpec) -> ProviderReply | None:
        """Preflight. For OpenAI-compatible endpoints the model list is free and proves the
        host answers, takes the key and serves the model; elsewhere, or when the list does
        not name the model, a one-token completion."""
        if not spec.model.startswith("openai/"):
            return await super().check(spec)
        import httpx

        base = (spec.api_base or "https://api.openai.com/v1").rstrip("/")
        api_key = spec.api_key() or ("EMPTY" if spec.api_base else None)
        register_secrets([api_key])
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        try:
            async with httpx.AsyncClient(timeout=spec.timeout) as client:
                response = await client.get(f"{base}/models", headers=headers)
        except httpx.HTTPError as exc:
            raise TransientError(f"{type(exc).__name__}: {redact(str(exc))[:300]}") from None
        status = response.status_code
        if status in (401, 403):
            raise PermanentError(f"HTTP {status}: {redact(response.text)[:300]}", status)
        if status == 429 or status >= 500:
            raise TransientError(f"HTTP {status}: {redact(response.text)[:300]}", status=status)
        if status == 200:
            try:
                listed = {str(m.get("id")) for m in response.json().get("data") or []}
            except (ValueError, AttributeError):
                listed = set()
            if spec.model.removeprefix("openai/") in listed:
                return None
        return await super().check(spec)


@hookimpl
def vkr_register_providers(register: Any) -> None:
    register(LitellmProvider())
