"""The fake OpenAI-compatible server, exercised through the real litellm client over HTTP."""

from __future__ import annotations

import base64
import io
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"

import av  # noqa: E402
import click  # noqa: E402
import litellm  # noqa: E402
import pytest  # noqa: E402
import yaml  # noqa: E402
from click.testing import CliRunner  # noqa: E402
from pydantic import BaseModel, ValidationError  # noqa: E402

from plugins.providers import fake_server  # noqa: E402
from plugins.providers.fake_policy import load_policy  # noqa: E402
from plugins.providers.fake_server import (  # noqa: E402
    FakeModelServer,
    find_tag,
    truth_for_tag,
    write_pool,
)
from plugins.steps.schemas import (  # noqa: E402
    BlindAnswer,
    CoTCheck,
    GeneratedExample,
    SolvedAnswer,
)
from vkr_core import hookspecs  # noqa: E402
from vkr_core.config import load_pool, load_registry  # noqa: E402
from vkr_core.hookspecs import hookimpl  # noqa: E402
from vkr_core.plugins import VkrPluginManager, collect  # noqa: E402
from vkr_core.schemas import InputError  # noqa: E402
from vkr_core.steps import Gate  # noqa: E402

litellm.suppress_debug_info = True

REPO = Path(__file__).resolve().parent.parent
SCHEMAS: dict[str, type[BaseModel]] = {
    "example_generation": GeneratedExample,
    "self_consistency": SolvedAnswer,
    "video_dependency": BlindAnswer,
    "cot_verification": CoTCheck,
    "single_frame_probe": SolvedAnswer,
}


# ---------------------------------------------------------------- fixtures and helpers


@pytest.fixture(scope="module")
def frames(testdata: Path) -> list[tuple[str, str]]:
    """(mm:ss label, JPEG data URL) of real frames of the pancake clip at 0, 4 and 8 s."""
    wanted = [0.0, 4.0, 8.0]
    found: list[tuple[str, str]] = []
    with av.open(str(testdata / "flipping_a_pancake.mkv")) as container:
        stream = container.streams.video[0]
        for frame in container.decode(stream):
            if frame.time is None or not wanted or frame.time < wanted[0]:
                continue
            seconds = wanted.pop(0)
            image = frame.to_image()
            image.thumbnail((256, 256))
            buffer = io.BytesIO()
            image.save(buffer, format="JPEG", quality=80)
            url = "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()
            found.append((f"00:{int(seconds):02d}", url))
    assert len(found) == 3
    return found


@pytest.fixture(scope="module")
def server() -> Any:
    with FakeModelServer(seed=7) as running:
        yield running


@pytest.fixture(autouse=True)
def fresh(request: pytest.FixtureRequest) -> None:
    if "server" in request.fixturenames:
        srv = request.getfixturevalue("server")
        srv.set_policy({})
        srv.reset_stats()


def user_message(frames: list[tuple[str, str]], text: str) -> list[dict[str, Any]]:
    parts: list[dict[str, Any]] = [{"type": "text", "text": text}]
    for clock, url in frames:
        parts.append({"type": "text", "text": f"Frame at {clock}:"})
        parts.append({"type": "image_url", "image_url": {"url": url}})
    return [
        {"role": "system", "content": "You write and check video questions. Reply in JSON."},
        {"role": "user", "content": parts},
    ]


def gate_prompt(frames: list[tuple[str, str]], question: str) -> list[dict[str, Any]]:
    return user_message(frames, f"Answer this question about the video.\n\nQuestion: {question}")


async def ask(
    server: FakeModelServer,
    step: str,
    messages: list[dict[str, Any]],
    model: str = "fake-a",
    seed: int | None = None,
    **kwargs: Any,
) -> Any:
    extra: dict[str, Any] = {} if seed is None else {"seed": seed}
    kwargs.setdefault("max_retries", 0)
    return await litellm.acompletion(
        model=f"openai/{model}",
        api_base=server.base_url,
        api_key="sk-test-not-a-real-key",
        messages=messages,
        temperature=0.0,
        max_tokens=512,
        extra_headers={"X-Vkr-Step": step},
        **extra,
        **kwargs,
    )


def content(reply: Any) -> str:
    return reply.choices[0].message.content


def http(
    server: FakeModelServer, method: str, path: str, body: Any = None, raw: bytes | None = None
) -> tuple[int, dict[str, str], Any]:
    """A plain stdlib HTTP call to the server (status, headers, parsed JSON body)."""
    root = server.base_url.removesuffix("/v1")
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    req = urllib.request.Request(root + path, data=data, method=method)
    req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, dict(resp.headers), json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), json.loads(err.read())


# ---------------------------------------------------------------- replies per step


async def test_every_step_replies_with_its_schema(server, frames) -> None:
    generated = await ask(server, "example_generation", user_message(frames, "Write one question."))
    example = GeneratedExample.model_validate_json(content(generated))
    tag = find_tag([example.question])
    assert tag is not None, example.question
    assert example.answer == truth_for_tag(tag)
    # The question cites one of the frame timestamps it was shown.
    assert re.search(r"00:0[048]", example.question), example.question
    assert 2 <= len(example.reasoning.splitlines()) <= 4
    assert generated.choices[0].finish_reason == "stop"

    for step, schema in SCHEMAS.items():
        if step == "example_generation":
            continue
        reply = await ask(server, step, gate_prompt(frames, example.question))
        parsed = schema.model_validate_json(content(reply))
        assert reply.choices[0].finish_reason == "stop"
        if isinstance(parsed, SolvedAnswer):
            assert 2 <= len(parsed.reasoning.splitlines()) <= 4

    unknown = await ask(server, "some_new_verifier", gate_prompt(frames, example.question))
    assert set(json.loads(content(unknown))) == {"answer"}


async def test_usage_counts_text_and_images(server, frames) -> None:
    messages = user_message(frames, "Write one question.")
    reply = await ask(server, "example_generation", messages)
    text_chars = len(messages[0]["content"]) + sum(
        len(part["text"]) for part in messages[1]["content"] if part["type"] == "text"
    )
    usage = reply.usage
    assert usage.prompt_tokens >= 85 * len(frames) + text_chars // 4
    assert usage.prompt_tokens <= 85 * len(frames) + text_chars // 4 + 1
    assert usage.completion_tokens >= len(content(reply)) // 4
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


async def test_about_a_third_of_generated_questions_are_open_ended(server, frames) -> None:
    kinds = []
    for seed in range(45):
        reply = await ask(server, "example_generation", user_message(frames, "Write."), seed=seed)
        example = GeneratedExample.model_validate_json(content(reply))
        kinds.append(example.problem_type)
        if example.problem_type == "multiple choice":
            assert [o[:2] for o in example.options or []] == ["A.", "B.", "C.", "D."]
    share = kinds.count("open-ended") / len(kinds)
    assert 0.15 <= share <= 0.55, share


def test_truth_is_a_pure_function_of_the_tag() -> None:
    assert truth_for_tag("[q:0000000b:mc]") == "D"
    assert truth_for_tag("Q: [q:00000004:mc] what?") == "A"
    assert truth_for_tag("[q:00000001:oe]") == truth_for_tag("prefix [q:00000001:oe]")
    assert truth_for_tag("[q:00000001:oe]") != truth_for_tag("[q:00000002:oe]")
    with pytest.raises(ValueError, match="no question tag"):
        truth_for_tag("[q:XYZ:mc]")


# ---------------------------------------------------------------- accuracy and verdicts


async def test_gate_accuracy_follows_the_policy(server, frames) -> None:
    server.set_policy({"steps": {"self_consistency": {"accuracy": 0.7}}})
    right = 0
    for i in range(50):
        tag = f"[q:{i * 2654435761 % 2**32:08x}:{'oe' if i % 3 == 0 else 'mc'}]"
        reply = await ask(server, "self_consistency", gate_prompt(frames, f"{tag} What happens?"))
        right += SolvedAnswer.model_validate_json(content(reply)).answer == truth_for_tag(tag)
    assert 25 <= right <= 45, right


async def test_policy_layers_override_in_order(server, frames) -> None:
    question = "[q:1234abcd:mc] What is done at 00:04?"
    truth = truth_for_tag(question)
    server.set_policy(
        {
            "defaults": {"accuracy": 1.0},
            "steps": {"video_dependency": {"accuracy": 0.0}},
            "models": {"fake-c": {"accuracy": 1.0}},
            "model_steps": {"fake-c|single_frame_probe": {"accuracy": 0.0}},
        }
    )

    async def answer(model: str, step: str) -> str:
        reply = await ask(server, step, gate_prompt(frames, question), model=model)
        return json.loads(content(reply))["answer"]

    assert await answer("fake-a", "self_consistency") == truth  # defaults
    assert await answer("fake-a", "video_dependency") != truth  # step beats defaults
    assert await answer("fake-c", "video_dependency") == truth  # model beats step
    assert await answer("fake-c", "single_frame_probe") != truth  # (model, step) beats model


async def test_cot_verification_fails_on_a_critical_unsupported_step(server, frames) -> None:
    prompt = gate_prompt(frames, "[q:00c0ffee:mc] Why? Reasoning: 1. At 00:04 ... 2. ...")
    server.set_policy({"cot_pass": 0.0})
    failed = CoTCheck.model_validate_json(content(await ask(server, "cot_verification", prompt)))
    assert failed.verdict == "fail"
    assert any(s.support == "unsupported" and s.critical for s in failed.steps)
    server.set_policy({"cot_pass": 1.0})
    passed = CoTCheck.model_validate_json(content(await ask(server, "cot_verification", prompt)))
    assert passed.verdict == "pass"
    assert all(s.support != "unsupported" for s in passed.steps)


# ---------------------------------------------------------------- determinism


async def test_identical_requests_get_identical_replies(server, frames) -> None:
    server.set_policy({"accuracy": 0.5, "malformed": 0.2, "refusal": 0.2})
    messages = user_message(frames, "Write one question.")
    first = await ask(server, "example_generation", messages, seed=3)
    again = await ask(server, "example_generation", messages, seed=3)
    assert content(first) == content(again)
    assert first.id == again.id

    # The sample index (seed) is part of the decision: different samples differ.
    samples = {content(await ask(server, "example_generation", messages, seed=s)) for s in range(6)}
    assert len(samples) > 1
    # So are the images: the same text with one frame swapped is a different request.
    swapped = user_message([frames[0], frames[2], frames[1]], "Write one question.")
    assert content(await ask(server, "example_generation", swapped, seed=3)) != content(first)

    # A restarted server with the same seed answers the same; another seed does not have to.
    with FakeModelServer(policy=server.policy, seed=7) as restarted:
        assert content(await ask(restarted, "example_generation", messages, seed=3)) == content(
            first
        )
    with FakeModelServer(policy=server.policy, seed=8) as other:
        replies = [
            content(await ask(other, "example_generation", messages, seed=s)) for s in range(3)
        ]
    originals = [
        content(await ask(server, "example_generation", messages, seed=s)) for s in range(3)
    ]
    assert replies != originals


# ---------------------------------------------------------------- faults


async def test_rate_limit_is_a_429_with_retry_after(server, frames) -> None:
    server.set_policy({"script": ["429"], "retry_after_s": 3})
    with pytest.raises(litellm.RateLimitError) as caught:
        await ask(server, "self_consistency", gate_prompt(frames, "[q:00000001:mc] ?"))
    assert caught.value.litellm_response_headers["retry-after"] == "3"
    # The script is used up, so the retry succeeds.
    reply = await ask(server, "self_consistency", gate_prompt(frames, "[q:00000001:mc] ?"))
    SolvedAnswer.model_validate_json(content(reply))

    server.set_policy({"rate_limit": 1.0, "retry_after_s": 2})
    status, headers, body = http(
        server,
        "POST",
        "/v1/chat/completions",
        {"model": "fake-b", "messages": [{"role": "user", "content": "hi"}]},
    )
    assert status == 429
    assert headers["Retry-After"] == "2"
    assert body["error"]["code"] == "rate_limit_exceeded"
    assert "fake-b" in body["error"]["message"]


async def test_server_errors_map_to_litellm_errors(server, frames) -> None:
    server.set_policy({"script": ["500", "503"]})
    with pytest.raises(litellm.InternalServerError):
        await ask(server, "video_dependency", gate_prompt(frames, "[q:00000001:mc] ?"))
    with pytest.raises(litellm.ServiceUnavailableError):
        await ask(server, "video_dependency", gate_prompt(frames, "[q:00000001:mc] ?"))
    assert server.stats()["faults"] == {"500": 1, "503": 1}


async def test_transport_faults_are_drawn_per_request_so_retries_succeed(server, frames) -> None:
    server.set_policy({"rate_limit": 0.5})
    prompt = gate_prompt(frames, "[q:0000abcd:mc] same request every time")
    outcomes = []
    for _ in range(30):
        try:
            await ask(server, "self_consistency", prompt)
            outcomes.append("ok")
        except litellm.RateLimitError:
            outcomes.append("429")
    assert 5 <= outcomes.count("429") <= 25, outcomes
    # With litellm's own retries, the identical request gets through.
    server.set_policy({"rate_limit": 0.5, "retry_after_s": 0})
    reply = await ask(server, "self_consistency", prompt, num_retries=6)
    SolvedAnswer.model_validate_json(content(reply))


async def test_script_runs_in_order_per_model_then_shares_apply(server, frames) -> None:
    server.set_policy(
        {"script": ["429", "500", "malformed", "refusal", "ok"], "retry_after_s": 0, "accuracy": 1}
    )
    prompt = gate_prompt(frames, "[q:00000002:mc] What happens at 00:04?")

    async def outcome(model: str) -> str:
        try:
            reply = await ask(server, "self_consistency", prompt, model=model)
        except litellm.RateLimitError:
            return "429"
        except litellm.InternalServerError:
            return "500"
        if reply.choices[0].finish_reason == "content_filter":
            return "refusal"
        try:
            SolvedAnswer.model_validate_json(content(reply))
        except ValidationError:
            return "malformed"
        return "ok"

    seen_a = [await outcome("fake-a") for _ in range(6)]
    assert seen_a == ["429", "500", "malformed", "refusal", "ok", "ok"]
    # Each model consumes its own copy of a default script.
    assert await outcome("fake-b") == "429"
    # A new policy starts the script again.
    server.set_policy({"script": ["500"]})
    assert await outcome("fake-a") == "500"
    assert await outcome("fake-a") == "ok"


async def test_refusals_are_content_filter_replies(server, frames) -> None:
    server.set_policy({"refusal": 1.0})
    reply = await ask(server, "example_generation", user_message(frames, "Write one question."))
    assert reply.choices[0].finish_reason == "content_filter"
    assert "can't help" in content(reply)
    assert server.stats()["completions"] == 1  # a refusal is still a billed 200


async def test_malformed_replies_fail_the_step_schema(server, frames) -> None:
    server.set_policy({"malformed": 1.0})
    for step, schema in SCHEMAS.items():
        for seed in range(4):
            messages = gate_prompt(frames, "[q:00000003:oe] What is shown at 00:08?")
            reply = await ask(server, step, messages, seed=seed)
            assert reply.choices[0].finish_reason == "stop"
            with pytest.raises(ValidationError):
                schema.model_validate_json(content(reply))


async def test_a_hang_outlasts_the_client_timeout(server, frames) -> None:
    server.set_policy({"script": ["hang"]})
    started = time.monotonic()
    with pytest.raises(litellm.Timeout):
        await ask(server, "cot_verification", gate_prompt(frames, "[q:00000004:mc] ?"), timeout=0.5)
    assert time.monotonic() - started < 5
    reply = await ask(server, "cot_verification", gate_prompt(frames, "[q:00000004:mc] ?"))
    CoTCheck.model_validate_json(content(reply))
    assert server.stats()["faults"] == {"hang": 1}


async def test_latency_is_added_to_every_request(server, frames) -> None:
    server.set_policy({"latency_ms": 300})
    started = time.monotonic()
    await ask(server, "video_dependency", gate_prompt(frames, "[q:00000005:mc] ?"))
    assert time.monotonic() - started >= 0.3


async def test_a_latency_tail_spreads_replies_the_same_way_every_time(server, frames) -> None:
    # The tail is a seeded exponential draw per request, on its own stream: the delays are
    # known in advance from the server's seed, and start again with each policy.
    draws = random.Random(server.seed)
    expected = [0.02 + draws.expovariate(1 / 80) / 1000 for _ in range(12)]
    assert max(expected) - min(expected) > 0.05  # a tail, not a constant

    async def delays() -> list[float]:
        server.set_policy({"latency_ms": 20, "latency_tail_ms": 80})  # the seed starts again
        out = []
        for i in range(12):
            started = time.monotonic()
            await ask(server, "video_dependency", gate_prompt(frames, f"[q:000001{i:02d}:mc] ?"))
            out.append(time.monotonic() - started)
        return out

    # Each reply waits at least its own draw (a shared machine only adds to it), in both
    # passes: the same policy gives the same sequence of delays.
    for measured in (await delays(), await delays()):
        assert all(m >= e - 0.002 for m, e in zip(measured, expected, strict=True)), (
            measured,
            expected,
        )


def test_bad_requests_get_a_clear_400(server) -> None:
    status, _, body = http(server, "POST", "/v1/chat/completions", raw=b"{not json")
    assert status == 400 and "not valid JSON" in body["error"]["message"]
    status, _, body = http(server, "POST", "/chat/completions", {"model": "fake-a"})
    assert status == 400 and "'messages'" in body["error"]["message"]
    status, _, body = http(
        server,
        "POST",
        "/v1/chat/completions",
        {"model": "fake-a", "messages": [{"role": "user", "content": "hi"}], "stream": True},
    )
    assert status == 400 and "stream" in body["error"]["message"]
    assert server.stats()["faults"] == {"400": 3}
    assert server.stats()["completions"] == 0


# ---------------------------------------------------------------- stats and control


async def test_stats_count_completions_by_model_and_step(server, frames) -> None:
    prompt = gate_prompt(frames, "[q:00000006:mc] ?")
    await ask(server, "video_dependency", prompt, model="fake-c")
    await ask(server, "video_dependency", prompt, model="fake-d")
    await ask(server, "video_dependency", prompt, model="fake-d", seed=1)
    await ask(server, "cot_verification", prompt, model="fake-a")
    server.set_policy({"script": ["429"], "retry_after_s": 0})
    with pytest.raises(litellm.RateLimitError):
        await ask(server, "cot_verification", prompt, model="fake-a")

    stats = server.stats()
    assert stats["requests"] == 5
    assert stats["completions"] == 4
    assert stats["by_model"] == {"fake-a": 1, "fake-c": 1, "fake-d": 2}
    assert stats["by_step"] == {"cot_verification": 1, "video_dependency": 3}
    assert stats["by_model_step"] == {
        "fake-a|cot_verification": 1,
        "fake-c|video_dependency": 1,
        "fake-d|video_dependency": 2,
    }
    assert stats["faults"] == {"429": 1}
    assert stats["authorization"] == {"present": 5, "missing": 0, "distinct": 1}
    assert "sk-test-not-a-real-key" not in json.dumps(stats)

    status, _, over_http = http(server, "GET", "/stats")
    assert status == 200 and over_http == stats
    status, _, after = http(server, "POST", "/stats/reset")
    assert status == 200 and after["requests"] == 0 and server.stats()["by_model"] == {}


async def test_policy_can_be_replaced_over_http(server, frames) -> None:
    question = "[q:0000beef:mc] What is done at 00:04?"
    status, _, body = http(server, "POST", "/policy", {"accuracy": 0.0})
    assert status == 200 and body["defaults"]["accuracy"] == 0.0
    reply = await ask(server, "self_consistency", gate_prompt(frames, question))
    assert json.loads(content(reply))["answer"] != truth_for_tag(question)

    status, _, body = http(server, "POST", "/policy", {"models": {"fake-a": {"accuracy": 1.0}}})
    assert status == 200
    reply = await ask(server, "self_consistency", gate_prompt(frames, question))
    assert json.loads(content(reply))["answer"] == truth_for_tag(question)

    status, _, body = http(server, "POST", "/policy", {"models": {"fake-a": {"accuracy": 2}}})
    assert status == 400 and "models.fake-a.accuracy" in body["error"]["message"]
    status, _, body = http(server, "POST", "/policy", {"script": ["explode"]})
    assert status == 400 and "script" in body["error"]["message"]
    status, _, body = http(server, "POST", "/policy", {"acuracy": 0.5})
    assert status == 400 and "acuracy" in body["error"]["message"]
    # A rejected policy leaves the previous one in force.
    status, _, body = http(server, "GET", "/policy")
    assert body["models"]["fake-a"]["accuracy"] == 1.0


def test_policy_files_load_and_bad_ones_name_the_file(tmp_path: Path) -> None:
    good = tmp_path / "policy.yaml"
    good.write_text("accuracy: 0.9\nsteps:\n  cot_verification: {cot_pass: 0.5}\n")
    policy = load_policy(good)
    knobs, _ = policy.resolve("fake-a", "cot_verification")
    assert (knobs.accuracy, knobs.cot_pass) == (0.9, 0.5)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"models": {"fake-a": {"rate_limit": -1}}}))
    with pytest.raises(InputError, match=r"bad\.json.*models\.fake-a\.rate_limit"):
        load_policy(bad)
    with pytest.raises(InputError, match="not found"):
        load_policy(tmp_path / "missing.yaml")


async def test_start_inside_with_can_pick_the_port(frames) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        free_port = probe.getsockname()[1]
    with FakeModelServer(policy={"accuracy": 1.0}) as srv:
        assert srv.start() == srv.base_url  # already running: same server
        url = srv.start(port=free_port)
        assert url == f"http://127.0.0.1:{free_port}/v1"
        reply = await ask(srv, "video_dependency", gate_prompt(frames, "[q:00000008:mc] ?"))
        assert json.loads(content(reply))["answer"] == truth_for_tag("[q:00000008:mc]")
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(url.removesuffix("/v1") + "/health", timeout=2)


def test_only_loopback_hosts_are_served() -> None:
    with pytest.raises(InputError, match="loopback"):
        FakeModelServer().start(host="0.0.0.0")


# ---------------------------------------------------------------- pool and registry


class _ProbeGate(Gate):
    name = "single_frame_probe"
    prompt_version = "probe-v3"
    output_schema = SolvedAnswer


class _StepsPlugin:
    @staticmethod
    @hookimpl
    def vkr_register_steps(register: Any) -> None:
        register(_ProbeGate())


async def test_written_pool_loads_and_serves(server, frames, tmp_path, monkeypatch) -> None:
    pm = VkrPluginManager("vkr")
    pm.add_hookspecs(hookspecs)
    pm.register(fake_server, name="plugins.providers.fake_server")
    pm.register(_StepsPlugin(), name="third-party-steps")
    pm.registry = collect(pm)

    pool_path = write_pool(tmp_path / "pool.yaml", server.base_url, pm=pm)
    pool = load_pool(pool_path)
    assert pool.names() == ["fake-a", "fake-b", "fake-c", "fake-d"]
    assert pool.steps["video_dependency"].models == ["fake-c", "fake-d"]
    for spec in pool.models:
        assert spec.model == f"openai/{spec.name}" and spec.api_base == server.base_url
        assert spec.api_key_env == "VKR_FAKE_API_KEY" and spec.sees_images()
        assert spec.max_concurrency == 8
        assert spec.input_cost_per_token and spec.output_cost_per_token

    registry_path = pool.registry_path()
    assert registry_path is not None and registry_path.is_file()
    registry = load_registry(registry_path)
    for step in SCHEMAS:
        for name in pool.names():
            entry = registry.entry(step, name)
            assert entry is not None and entry.eligible and entry.error_rate == 0.0
            assert entry.n == 100
    # The registered step's version: its prompt version and its output schema's hash.
    probe = registry.entry("single_frame_probe", "fake-b")
    assert probe is not None and probe.prompt_version == _ProbeGate().version()
    assert probe.prompt_version.startswith("probe-v3-")
    assert registry.entry("self_consistency", "fake-b").prompt_version is None

    # The pool is usable as written: its entries drive a real call.
    monkeypatch.setenv("VKR_FAKE_API_KEY", "sk-from-env")
    spec = pool.get("fake-c")
    reply = await litellm.acompletion(
        model=spec.model,
        api_base=spec.api_base,
        api_key=spec.api_key(),
        messages=gate_prompt(frames, "[q:00000007:mc] ?"),
        extra_headers={"X-Vkr-Step": "video_dependency"},
        max_retries=0,
    )
    BlindAnswer.model_validate_json(content(reply))
    assert server.stats()["by_model_step"] == {"fake-c|video_dependency": 1}


def test_write_pool_with_registry_elsewhere(tmp_path: Path) -> None:
    pool_path = write_pool(
        tmp_path / "a" / "pool.yaml",
        "http://127.0.0.1:9/v1",
        models=("m1", "m2", "m3"),
        registry_path=tmp_path / "b" / "eligible.yaml",
    )
    pool = load_pool(pool_path)
    assert pool.registry_path() == (tmp_path / "b" / "eligible.yaml").resolve()
    assert pool.steps["video_dependency"].models == ["m2", "m3"]
    assert set(load_registry(pool.registry_path()).steps["example_generation"]) == {
        "m1",
        "m2",
        "m3",
    }


# ---------------------------------------------------------------- CLI


_CLI_BOOT = (
    "import cli, pluggy;"
    "from vkr_core import hookspecs;"
    "from plugins.providers import fake_server;"
    "pm = pluggy.PluginManager('vkr'); pm.add_hookspecs(hookspecs);"
    "pm.register(fake_server); pm.hook.vkr_register_commands(cli=cli.cli);"
    "cli.cli()"
)


def test_cli_serves_until_sigterm(tmp_path: Path) -> None:
    pool_file = tmp_path / "pool.yaml"
    policy_file = tmp_path / "policy.yaml"
    policy_file.write_text(yaml.safe_dump({"accuracy": 0.0}))
    proc = subprocess.Popen(
        [sys.executable, "-c", _CLI_BOOT, "dev", "fake-server", "--port", "0", "--seed", "3"]
        + ["--policy", str(policy_file), "--write-pool", str(pool_file)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        match = re.match(r"fake model server: (http://127\.0\.0\.1:\d+/v1)$", first.strip())
        assert match, first + (proc.stderr.read() if proc.poll() is not None else "")
        base_url = match.group(1)
        lines = [proc.stdout.readline() for _ in range(2)]
        assert any(str(pool_file.resolve()) in line for line in lines), lines

        assert load_pool(pool_file).models[0].api_base == base_url
        body = json.dumps(
            {
                "model": "fake-a",
                "messages": [{"role": "user", "content": "[q:00000009:mc] at 00:04?"}],
            }
        ).encode()
        req = urllib.request.Request(
            base_url + "/chat/completions",
            data=body,
            headers={"Content-Type": "application/json", "X-Vkr-Step": "video_dependency"},
        )
        with urllib.request.urlopen(req, timeout=10) as resp:
            reply = json.loads(resp.read())
        answer = json.loads(reply["choices"][0]["message"]["content"])["answer"]
        assert answer != truth_for_tag("[q:00000009:mc]")  # the policy file was applied
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=10)
    assert code == 0


def test_cli_refuses_non_loopback_hosts() -> None:
    @click.group()
    def root() -> None:
        """A fresh root group, so this test leaves the real ``cli`` untouched."""

    fake_server.vkr_register_commands(cli=root)
    result = CliRunner().invoke(root, ["dev", "fake-server", "--host", "0.0.0.0"])
    assert result.exit_code == 2
    assert "not a loopback address" in result.output


# ---------------------------------------------------------------- concurrency seen


async def test_the_peak_of_requests_in_flight_is_counted_per_model(server, frames) -> None:
    """What a concurrency limit's test reads (local or across a Ray cluster): the most
    requests of one model the server held at once, reset with the stats."""
    import asyncio

    server.set_policy({"latency_ms": 300})
    prompt = "Write one question."
    await asyncio.gather(
        *(
            ask(server, "example_generation", user_message(frames, f"{prompt} {i}"), model="peak-a")
            for i in range(3)
        ),
        ask(server, "example_generation", user_message(frames, prompt), model="peak-b"),
    )
    await ask(server, "example_generation", user_message(frames, f"{prompt} alone"), model="peak-a")
    peaks = server.stats()["peak_in_flight"]  # other tests may leave requests hanging
    assert (peaks["peak-a"], peaks["peak-b"]) == (3, 1)
    server.reset_stats()
    assert server.stats()["peak_in_flight"] == {}
