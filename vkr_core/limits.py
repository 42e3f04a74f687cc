"""Per-model rate limits: concurrency that adapts to 429s, requests and tokens per minute.

Concurrency follows AIMD, like TCP: each 429 halves the model's concurrency limit and
pauses the model for the provider's Retry-After; each success grows the limit back by
1/limit, up to the pool's ``max_concurrency``.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass, field

WINDOW_S = 60.0


@dataclass
class ModelLimiter:
    max_concurrency: int
    rpm: int | None = None
    tpm: int | None = None
    window_s: float = WINDOW_S
    limit: float = field(init=False)
    in_flight: int = field(default=0, init=False)
    paused_until: float = field(default=0.0, init=False)
    rate_limited: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        self.limit = float(self.max_concurrency)
        self._changed = asyncio.Condition()
        self._requests: deque[float] = deque()
        self._tokens: deque[tuple[float, int]] = deque()

    def _wait_needed(self, now: float, tokens: int) -> float:
        """Seconds to wait before another request may start (0: go now)."""
        waits = [self.paused_until - now]
        while self._requests and now - self._requests[0] >= self.window_s:
            self._requests.popleft()
        while self._tokens and now - self._tokens[0][0] >= self.window_s:
            self._tokens.popleft()
        if self.rpm is not None and len(self._requests) >= self.rpm:
            waits.append(self._requests[0] + self.window_s - now)
        if self.tpm is not None and self._tokens:
            used = sum(n for _, n in self._tokens)
            # A request bigger than the whole budget still runs alone, once the window is empty.
            if used + tokens > self.tpm:
                waits.append(self._tokens[0][0] + self.window_s - now)
        return max(waits)

    async def acquire(self, tokens: int = 0) -> None:
        async with self._changed:
            while True:
                now = time.monotonic()
                wait = self._wait_needed(now, tokens)
                if wait <= 0 and self.in_flight < max(1, int(self.limit)):
                    break
                try:
                    await asyncio.wait_for(self._changed.wait(), timeout=wait if wait > 0 else None)
                except TimeoutError:
                    pass
            self.in_flight += 1
            self._requests.append(now)
            if tokens:
                self._tokens.append((now, tokens))

    async def release(
        self, *, ok: bool, rate_limited: bool = False, retry_after: float | None = None
    ) -> None:
        async with self._changed:
            self.in_flight -= 1
            if rate_limited:
                self.rate_limited += 1
                self.limit = max(1.0, self.limit / 2)
                pause = retry_after if retry_after is not None else 1.0
                self.paused_until = max(self.paused_until, time.monotonic() + pause)
            elif ok:
                self.limit = min(float(self.max_concurrency), self.limit + 1.0 / self.limit)
            self._changed.notify_all()


@dataclass
class SpendLimit:
    """A run's budget (``--max-spend``): what the run directory has paid, against a limit.

    ``spent`` starts at what earlier invocations on the same run directory paid, so a rerun
    with the same limit does not spend it a second time.
    """

    limit_usd: float
    spent_usd: float = 0.0
    _reached: asyncio.Event | None = field(default=None, init=False, repr=False)

    @property
    def reached(self) -> bool:
        return self.spent_usd >= self.limit_usd

    def add(self, cost_usd: float) -> None:
        self.spent_usd += cost_usd
        if self.reached and self._reached is not None:
            self._reached.set()

    async def wait(self) -> None:
        """Return once the spend has reached the limit."""
        if self._reached is None:
            self._reached = asyncio.Event()
        if self.reached:
            return
        await self._reached.wait()
