"""An httpx transport that journals every 200 body the moment it is read, for any protocol.

litellm parses OpenAI, Anthropic and Gemini replies in different code, but all of them read
the body through an httpx client, and that client can be given a transport. This one sits
under it: a request that carries the call's key (the ``X-Vkr-Call`` header) and whose reply
is already in the journal is answered from the journal without touching the network, so
litellm's real parser turns a reply paid for by a killed run into the reply of this one;
otherwise the request goes out and a 200 body is saved before litellm sees a byte of it.
"""

from __future__ import annotations

from typing import Any

import httpx

from vkr_core.calls import CALL_KEY_HEADER, Journal

# Headers that describe the bytes on the wire, not the decoded body the journal keeps (and a
# replay or a re-wrapped reply serves).
_WIRE_HEADERS = frozenset({"content-encoding", "content-length", "transfer-encoding"})


class JournallingTransport(httpx.AsyncBaseTransport):
    """Journals 200 bodies keyed by ``X-Vkr-Call`` and replays them on the next attempt."""

    def __init__(self, journal: Journal, inner: httpx.AsyncBaseTransport | None = None):
        if inner is None:
            inner = _litellm_transport()
        self.journal = journal
        self.inner: Any = inner
        # Keys answered from the journal and not yet claimed by the caller: how a reply
        # litellm parsed is known to be a recovered one (``ProviderReply.recovered``).
        self._replayed: set[str] = set()

    def replayed(self, call_key: str | None) -> bool:
        """Whether this call's reply came from the journal (asked once, after the call)."""
        if call_key is None or call_key not in self._replayed:
            return False
        self._replayed.discard(call_key)
        return True

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        call_key = request.headers.get(CALL_KEY_HEADER)
        if call_key:
            raw = self.journal.load(call_key)
            if raw is not None:
                self._replayed.add(call_key)
                return httpx.Response(
                    200, headers={"content-type": "application/json"}, content=raw
                )
        response = await self.inner.handle_async_request(request)
        if not call_key or response.status_code != 200:
            return response
        # Read here rather than by the client so the body is in the journal before litellm
        # parses it: a crash from now on costs nothing. aread() undoes the content encoding
        # exactly as the client would.
        try:
            body = await response.aread()
        finally:
            await response.aclose()
        self.journal.save(call_key, body)
        headers = [(k, v) for k, v in response.headers.items() if k.lower() not in _WIRE_HEADERS]
        return httpx.Response(200, headers=headers, content=body)

    async def aclose(self) -> None:
        await self.inner.aclose()


def _litellm_transport() -> httpx.AsyncBaseTransport:
    """The transport litellm's own client would use, with the same TLS settings (its
    ``SSL_VERIFY`` / ``SSL_CERT_FILE`` handling), so a route that gets vkr's client instead of
    litellm's connects the same way."""
    import ssl

    from litellm.llms.custom_httpx.http_handler import AsyncHTTPHandler, get_ssl_configuration

    ssl_config = get_ssl_configuration(None)
    # litellm's aiohttp-backed transport by default: a plain httpx transport costs about
    # 1.5 ms more CPU per call (bench/bench_calls.py).
    transport = AsyncHTTPHandler.create_async_transport(
        ssl_context=ssl_config if isinstance(ssl_config, ssl.SSLContext) else None,
        ssl_verify=ssl_config if isinstance(ssl_config, bool) else None,
    )
    if transport is None:  # litellm's answer for "httpx's default" when aiohttp is off
        verify = ssl_config if isinstance(ssl_config, (bool, ssl.SSLContext)) else True
        transport = httpx.AsyncHTTPTransport(verify=verify)
    return transport
