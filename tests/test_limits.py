"""Per-model limits: requests and tokens per window, AIMD concurrency, and bad pool limits."""

from __future__ import annotations

import asyncio
import time

import pytest

from vkr_core.config import load_pool
from vkr_core.limits import ModelLimiter
from vkr_core.schemas import InputError


def test_requests_per_window_are_paced():
    async def go():
        limiter = ModelLimiter(max_concurrency=8, rpm=2, window_s=0.4)
        started = time.monotonic()
        stamps = []
        for _ in range(5):
            await limiter.acquire()
            stamps.append(time.monotonic() - started)
            await limiter.release(ok=True)
        return stamps

    stamps = asyncio.run(go())
    # Two per window: the 3rd waits for the 1st to age out, the 5th for the 3rd.
    assert stamps[1] < 0.2 and 0.38 <= stamps[2] < 0.7 and stamps[4] >= 0.78


def test_tokens_per_window_are_paced_but_a_huge_request_still_runs():
    async def go():
        limiter = ModelLimiter(max_concurrency=8, tpm=1000, window_s=0.4)
        started = time.monotonic()
        await limiter.acquire(600)
        await limiter.release(ok=True)
        await limiter.acquire(600)  # 1200 > 1000: waits for the window
        second = time.monotonic() - started
        await limiter.release(ok=True)
        await limiter.acquire(5000)  # bigger than the budget: runs alone once the window clears
        third = time.monotonic() - started
        return second, third

    second, third = asyncio.run(go())
    assert second >= 0.38 and third >= 0.78


def test_a_429_halves_concurrency_and_pauses_for_retry_after_then_recovers():
    async def go():
        limiter = ModelLimiter(max_concurrency=8)
        await limiter.acquire()
        await limiter.release(ok=False, rate_limited=True, retry_after=0.3)
        halved = limiter.limit
        started = time.monotonic()
        await limiter.acquire()
        paused = time.monotonic() - started
        await limiter.release(ok=True)
        for _ in range(200):
            await limiter.acquire()
            await limiter.release(ok=True)
        return halved, paused, limiter.limit

    halved, paused, recovered = asyncio.run(go())
    assert halved == 4.0 and paused >= 0.28 and recovered == 8.0


def test_concurrency_limit_holds_under_load():
    async def go():
        limiter = ModelLimiter(max_concurrency=3)
        peak = 0

        async def task():
            nonlocal peak
            await limiter.acquire()
            peak = max(peak, limiter.in_flight)
            await asyncio.sleep(0.01)
            await limiter.release(ok=True)

        await asyncio.gather(*(task() for _ in range(30)))
        return peak

    assert asyncio.run(go()) == 3


@pytest.mark.parametrize("field", ["rpm", "tpm", "max_concurrency"])
def test_negative_or_zero_limits_in_a_pool_are_clear_errors(tmp_path, field):
    (tmp_path / "pool.yaml").write_text(
        f"models:\n  - name: a\n    model: openai/a\n    {field}: -5\n"
    )
    with pytest.raises(
        InputError,
        match=rf"pool file .* is invalid: models\.0\.{field}: .*greater than or equal to 1",
    ):
        load_pool(tmp_path / "pool.yaml")
