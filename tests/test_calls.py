"""Model calls through the real litellm client over HTTP: cache, retries, records."""

from __future__ import annotations

import asyncio
import json

import pytest

from plugins.providers.litellm_provider import LitellmProvider
from plugins.steps.schemas import SolvedAnswer
from vkr_core.calls import CallFailed, ModelCaller, RetrySettings, cache_key
from vkr_core.config import ModelSpec
from vkr_core.schemas import Frame
from vkr_core.steps import ReplyError, Step


class Solve(Step):
    name = "self_consistency"
    output_schema = SolvedAnswer


def frame(sha: str) -> Frame:
    # The path does not exist: building a key must never read image bytes.
    return Frame(index=0, timestamp=5.0, sha256=sha, path="/nonexistent/f.jpg", width=1, height=1)


def messages_with(
    frames: list[Frame], text: str = "Question: [q:0000000a:mc] Which?"
) -> list[dict]:
    from vkr_core.calls import image_part

    return [
        {
            "role": "user",
            "content": [*(image_part(f) for f in frames), {"type": "text", "text": text}],
        }
    ]


def spec(url: str | None = None, name: str = "fake-a", **extra) -> ModelSpec:
    extra.setdefault("input_cost_per_token", 1e-6)
    extra.setdefault("output_cost_per_token", 2e-6)
    return ModelSpec(name=name, model=f"openai/{name}", api_base=url, **extra)


def test_cache_key_follows_prompt_version_and_image_content_only():
    msgs = messages_with([frame("a" * 64) for _ in range(69)])
    base = cache_key(spec(), "s", "v1-x", msgs, {"temperature": 0}, 0)
    assert cache_key(spec(), "s", "v2-x", msgs, {"temperature": 0}, 0) != base
    other_image = messages_with([frame("a" * 64)] * 68 + [frame("b" * 64)])
    assert cache_key(spec(), "s", "v1-x", other_image, {"temperature": 0}, 0) != base
    assert cache_key(spec(), "s", "v1-x", msgs, {"temperature": 0}, 1) != base
    assert cache_key(spec(), "s", "v1-x", msgs, {"temperature": 0.5}, 0) != base
    # Concurrency, rate limits and timeouts do not change the answer, so not the key either.
    tuned = spec(max_concurrency=64, rpm=10, timeout=5)
    assert cache_key(tuned, "s", "v1-x", msgs, {"temperature": 0}, 0) == base
    assert cache_key(spec(url="http://other/v1"), "s", "v1-x", msgs, {"temperature": 0}, 0) != base


def make_caller(tmp_path, attempts=4) -> ModelCaller:
    return ModelCaller(
        cache_dir=tmp_path / "cache",
        providers={"litellm": LitellmProvider()},
        retry=RetrySettings(attempts=attempts, initial=0.01, maximum=0.05),
    )


def run_closing(caller: ModelCaller, coroutine):
    """Run a call in its own event loop and close the provider's connections, as a run does."""

    async def go():
        try:
            return await coroutine
        finally:
            for provider in caller.providers.values():
                await provider.aclose()

    return asyncio.run(go())


def call(caller: ModelCaller, url: str, text: str = "Question: [q:0000000a:mc] Which?", **kw):
    step = Solve()
    return run_closing(
        caller,
        caller.call(
            spec=spec(url),
            step=step.name,
            prompt_version="v1",
            messages=messages_with([], text),
            params={"temperature": 0},
            validate=step.parse,
            **kw,
        ),
    )


def test_second_identical_call_is_served_from_cache(tmp_path, vkr_fake_server):
    caller = make_caller(tmp_path)
    first = call(caller, vkr_fake_server.base_url)
    assert first.outcome == "ok" and not first.record.cache_hit
    assert first.record.cost_usd > 0 and first.record.prompt_tokens > 0
    SolvedAnswer.model_validate(json.loads(first.text))
    # A new caller on the same cache directory, as in a second run.
    caller.close()
    second = call(make_caller(tmp_path), vkr_fake_server.base_url)
    assert second.record.cache_hit and second.text == first.text
    assert vkr_fake_server.stats()["completions"] == 1


def test_rate_limits_and_server_errors_are_retried(tmp_path, vkr_fake_server):
    vkr_fake_server.set_policy({"script": ["429", "500", "ok"], "retry_after_s": 0.05})
    result = call(make_caller(tmp_path), vkr_fake_server.base_url)
    assert result.outcome == "ok" and result.record.attempts == 3
    stats = vkr_fake_server.stats()
    assert stats["requests"] == 3 and stats["completions"] == 1


def test_a_model_that_keeps_failing_raises_call_failed_and_caches_nothing(
    tmp_path, vkr_fake_server
):
    vkr_fake_server.set_policy({"server_error": 1.0})
    caller = make_caller(tmp_path, attempts=3)
    with pytest.raises(CallFailed, match="after 3 attempt"):
        call(caller, vkr_fake_server.base_url)
    assert caller.records[-1].outcome == "error"
    assert len(caller.cache) == 0


def test_refusals_are_not_retried_and_not_cached(tmp_path, vkr_fake_server):
    vkr_fake_server.set_policy({"refusal": 1.0})
    caller = make_caller(tmp_path)
    with pytest.raises(ReplyError) as err:
        call(caller, vkr_fake_server.base_url)
    assert err.value.kind == "refusal"
    assert vkr_fake_server.stats()["requests"] == 1
    assert len(caller.cache) == 0
    vkr_fake_server.set_policy({})
    assert call(caller, vkr_fake_server.base_url).outcome == "ok"


def test_malformed_reply_is_cached_as_malformed_with_raw_text(tmp_path, vkr_fake_server):
    vkr_fake_server.set_policy({"malformed": 1.0})
    caller = make_caller(tmp_path)
    first = call(caller, vkr_fake_server.base_url)
    assert first.outcome == "malformed" and first.text
    again = call(caller, vkr_fake_server.base_url)
    assert again.record.cache_hit and again.outcome == "malformed" and again.text == first.text
    assert vkr_fake_server.stats()["completions"] == 1


def test_client_errors_are_not_retried(tmp_path, vkr_fake_server):
    caller = make_caller(tmp_path)
    bad = ModelSpec(
        name="x", model="openai/fake-a", api_base=vkr_fake_server.base_url.replace("/v1", "/nope")
    )
    with pytest.raises(CallFailed, match="after 1 attempt"):
        run_closing(
            caller,
            caller.call(
                spec=bad, step="s", prompt_version="v1", messages=messages_with([]), params={}
            ),
        )


def test_a_reply_journalled_before_a_crash_is_replayed_not_paid_again(tmp_path, vkr_fake_server):
    """The window between a provider's answer and the cache write: the raw body is journalled
    by the HTTP layer as soon as it is read, so a run killed in that window replays it."""
    import httpx

    step = Solve()
    caller = make_caller(tmp_path)
    messages = messages_with([])
    params = {"temperature": 0}
    key = cache_key(spec(vkr_fake_server.base_url), step.name, "v1", messages, params, 0)
    # What the killed run received (and the server billed) but never cached.
    body = httpx.post(
        vkr_fake_server.base_url + "/chat/completions",
        json={
            "model": "fake-a",
            "messages": messages_with([])[0:1]
            and [
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "Question: [q:0000000a:mc] Which?"}],
                }
            ],
            "temperature": 0,
            "seed": 0,
        },
        headers={"X-Vkr-Step": step.name},
    ).content
    caller.journal.save(key, body)
    billed = vkr_fake_server.stats()["completions"]
    result = call(caller, vkr_fake_server.base_url)
    assert vkr_fake_server.stats()["completions"] == billed
    assert (
        result.outcome == "ok"
        and result.text == json.loads(body)["choices"][0]["message"]["content"]
    )
    assert not result.record.cache_hit and result.record.cost_usd > 0  # paid once, accounted once
    assert result.record.attempts == 0  # no request sent this time
    assert caller.journal.load(key) is None  # now in the cache proper
    assert call(caller, vkr_fake_server.base_url).record.cache_hit


def test_live_calls_leave_no_journal_entries_behind(tmp_path, vkr_fake_server):
    caller = make_caller(tmp_path)
    call(caller, vkr_fake_server.base_url)
    assert not [k for k in caller.cache.iterkeys() if str(k).startswith("raw:")]
