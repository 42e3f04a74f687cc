"""The fake model server's three protocols (OpenAI chat completions, Anthropic Messages, Gemini
generateContent), each exercised through the real litellm client over HTTP."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import math
import os
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"

import litellm  # noqa: E402
import pytest  # noqa: E402
import yaml  # noqa: E402
from click.testing import CliRunner  # noqa: E402
from PIL import Image  # noqa: E402
from pydantic import ValidationError  # noqa: E402

from plugins.providers import fake_server  # noqa: E402
from plugins.providers.fake_server import (  # noqa: E402
    TOKENS_PER_IMAGE,
    FakeModelServer,
    truth_for_tag,
    write_pool,
)
from plugins.steps.schemas import SolvedAnswer  # noqa: E402
from vkr_core.config import load_pool  # noqa: E402
from vkr_core.schemas import InputError  # noqa: E402

litellm.suppress_debug_info = True

PROTOCOLS = ("openai", "anthropic", "gemini")
SOLVED_SCHEMA = SolvedAnswer.model_json_schema()
API_KEY = "sk-test-not-a-real-key"
# A Gemini model name litellm does not know gets the schema pasted into the prompt instead of
# generationConfig.responseSchema; registering it as schema-capable, as a user does for a
# custom name, makes litellm send the native form.
GEMINI_WITH_SCHEMAS = "fake-gemini-schemas"
litellm.register_model(
    {
        f"gemini/{GEMINI_WITH_SCHEMAS}": {
            "litellm_provider": "gemini",
            "mode": "chat",
            "supports_response_schema": True,
            "supports_system_messages": True,
            "supports_vision": True,
        }
    }
)


@pytest.fixture(scope="module")
def server() -> Any:
    with FakeModelServer(seed=11) as running:
        yield running


@pytest.fixture(autouse=True)
def fresh(request: pytest.FixtureRequest) -> None:
    if "server" in request.fixturenames:
        srv = request.getfixturevalue("server")
        srv.set_policy({})
        srv.reset_stats()
        srv.clear_received()


def jpeg(colour: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 24), colour).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


FRAME = jpeg((200, 80, 20))
FRAME_URL = "data:image/jpeg;base64," + base64.b64encode(FRAME).decode()
QUESTION = "[q:0000000a:mc] What happens at 00:04?"


def messages(question: str = QUESTION, system: bool = True) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    if system:
        found.append(
            {"role": "system", "content": "You answer questions about videos. Reply in JSON."}
        )
    found.append(
        {
            "role": "user",
            "content": [
                {"type": "text", "text": f"Question: {question}"},
                {"type": "text", "text": "Frame at 00:04:"},
                {"type": "image_url", "image_url": {"url": FRAME_URL}},
            ],
        }
    )
    return found


def schema_model(protocol: str, model: str = "fake-a") -> str:
    """The model to use when the test needs litellm to send a native schema."""
    return GEMINI_WITH_SCHEMAS if protocol == "gemini" else model


async def ask(
    server: FakeModelServer,
    protocol: str,
    step: str = "self_consistency",
    model: str = "fake-a",
    schema: dict[str, Any] | None = None,
    **kwargs: Any,
) -> Any:
    if schema is not None:
        kwargs["response_format"] = {
            "type": "json_schema",
            "json_schema": {"name": "reply", "schema": schema, "strict": True},
        }
    kwargs.setdefault("messages", messages())
    kwargs.setdefault("max_retries", 0)
    return await litellm.acompletion(
        model=f"{protocol}/{model}",
        api_base=server.api_base(protocol),
        api_key=API_KEY,
        temperature=0.0,
        max_tokens=512,
        extra_headers={"X-Vkr-Step": step, "X-Vkr-Call": f"call-{protocol}-{step}-{model}"},
        **kwargs,
    )


def content(reply: Any) -> str:
    return reply.choices[0].message.content


def expected_prompt_tokens(texts: list[str], images: int) -> int:
    return max(1, math.ceil(sum(len(t) for t in texts) / 4)) + TOKENS_PER_IMAGE * images


def response_headers(exc: BaseException) -> Any:
    # litellm's exception mapping sets this on the instance; the classes do not declare it.
    return getattr(exc, "litellm_response_headers")  # noqa: B009


def post(url: str, body: Any, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method="POST")
    req.add_header("Content-Type", "application/json")
    for name, value in (headers or {}).items():
        req.add_header(name, value)
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


# ---------------------------------------------------------------- one brain, three mouths


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_text_and_image_get_the_answer_and_matching_usage(server, protocol) -> None:
    server.set_policy({"accuracy": 1.0})
    reply = await ask(server, protocol)
    answer = SolvedAnswer.model_validate_json(content(reply))
    assert answer.answer == truth_for_tag(QUESTION)
    assert reply.choices[0].finish_reason == "stop"
    (seen,) = server.received()
    assert seen.protocol == protocol and seen.model == "fake-a"
    assert seen.step == "self_consistency"
    assert seen.image_hashes == [hashlib.sha256(FRAME).hexdigest()]
    # litellm's usage is the server's count, by the same formula on every protocol.
    assert reply.usage.prompt_tokens == expected_prompt_tokens(seen.texts, 1)
    assert reply.usage.completion_tokens == math.ceil(len(content(reply)) / 4)
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    stats = server.stats()
    assert stats["by_protocol"] == {protocol: 1}
    assert stats["by_model_step"] == {"fake-a|self_consistency": 1}
    assert stats["authorization"] == {"present": 1, "missing": 0, "distinct": 1}


async def test_one_message_is_one_request_on_every_protocol(server) -> None:
    for protocol in PROTOCOLS:
        await ask(server, protocol)
    openai, anthropic, gemini = server.received()
    assert [r.protocol for r in (openai, anthropic, gemini)] == list(PROTOCOLS)
    assert openai.texts == anthropic.texts == gemini.texts
    assert openai.texts[0].startswith("You answer questions")  # the system prompt comes first
    assert openai.image_hashes == anthropic.image_hashes == gemini.image_hashes
    assert openai.normalised_messages == anthropic.normalised_messages
    # Each vendor bills its own call: the same question over three protocols is no repeat.
    assert server.stats()["repeats"] == 0
    # One key, whether sent as a bearer token, as x-api-key or as x-goog-api-key.
    assert server.stats()["authorization"] == {"present": 3, "missing": 0, "distinct": 1}


async def test_the_same_request_gets_the_same_reply_on_every_protocol(server) -> None:
    # Without a system prompt, litellm sends Gemini the same turns as the others (it folds a
    # system prompt into the user turn for Gemini models it does not know).
    replies = [
        content(
            await ask(server, protocol, step="example_generation", messages=messages(system=False))
        )
        for protocol in PROTOCOLS
    ]
    assert replies[0] == replies[1] == replies[2]
    assert len({json.dumps(r.normalised_messages) for r in server.received()}) == 1


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_a_repeated_call_is_counted_with_its_call_key(server, protocol) -> None:
    await ask(server, protocol)
    await ask(server, protocol)
    stats = server.stats()
    assert stats["completions"] == 2 and stats["repeats"] == 1
    # X-Vkr-Call travels through litellm's extra_headers on every protocol.
    assert stats["repeated_call_keys"] == [f"call-{protocol}-self_consistency-fake-a"]


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_the_script_runs_per_model_whatever_the_protocol(server, protocol) -> None:
    server.set_policy({"models": {"fake-b": {"script": ["malformed", "ok"]}}})
    first = await ask(server, protocol, model="fake-b")
    with pytest.raises(ValidationError):
        SolvedAnswer.model_validate_json(content(first))
    SolvedAnswer.model_validate_json(content(await ask(server, protocol, model="fake-b")))
    SolvedAnswer.model_validate_json(content(await ask(server, protocol, model="fake-a")))
    assert server.stats()["faults"] == {"malformed": 1}


# ---------------------------------------------------------------- refusals


async def test_refusals_as_litellm_presents_them(server) -> None:
    seen: dict[tuple[str, str], tuple[str, str | None, int]] = {}
    for protocol in PROTOCOLS:
        server.set_policy({"script": ["refusal", "blocked"]})
        for form in ("refusal", "blocked"):
            reply = await ask(server, protocol)
            seen[(protocol, form)] = (
                reply.choices[0].finish_reason,
                reply.choices[0].message.content,
                reply.usage.completion_tokens,
            )
    refusal_text = "I'm sorry, but I can't help with that request."
    declined = math.ceil(len(refusal_text) / 4)
    assert seen == {
        # OpenAI: finish_reason content_filter with the refusal as content.
        ("openai", "refusal"): ("content_filter", refusal_text, declined),
        ("openai", "blocked"): ("content_filter", refusal_text, declined),
        # Anthropic: stop_reason "refusal" becomes content_filter, text kept.
        ("anthropic", "refusal"): ("content_filter", refusal_text, declined),
        ("anthropic", "blocked"): ("content_filter", refusal_text, declined),
        # Gemini: finishReason SAFETY and promptFeedback.blockReason both become
        # content_filter with no content; a blocked prompt has no output tokens.
        ("gemini", "refusal"): ("content_filter", None, declined),
        ("gemini", "blocked"): ("content_filter", None, 0),
    }
    # A refusal is still a billed 200 on every protocol.
    stats = server.stats()
    assert stats["completions"] == 6
    assert stats["faults"] == {"blocked": 3, "refusal": 3}


async def test_gemini_blocked_prompt_has_feedback_and_no_candidate(server) -> None:
    server.set_policy({"script": ["blocked", "refusal"]})
    url = f"{server.api_base('gemini')}/models/fake-a:generateContent?key={API_KEY}"
    body = {"contents": [{"role": "user", "parts": [{"text": QUESTION}]}]}
    status, blocked = post(url, body)
    assert status == 200 and "candidates" not in blocked
    assert blocked["promptFeedback"]["blockReason"] == "SAFETY"
    assert blocked["usageMetadata"]["candidatesTokenCount"] == 0
    status, refused = post(url, body)
    (candidate,) = refused["candidates"]
    assert candidate["finishReason"] == "SAFETY" and "content" not in candidate
    assert candidate["safetyRatings"][0]["blocked"] is True
    # The key came in the query string, as Google's own clients may send it.
    assert server.stats()["authorization"]["present"] == 2


# ---------------------------------------------------------------- rate limits and outages


async def test_a_429_is_a_rate_limit_error_with_the_delay_where_each_vendor_puts_it(
    server,
) -> None:
    server.set_policy({"rate_limit": 1.0, "retry_after_s": 2.5})
    errors = {}
    for protocol in PROTOCOLS:
        with pytest.raises(litellm.RateLimitError) as caught:
            await ask(server, protocol)
        errors[protocol] = caught.value
    # OpenAI and Anthropic: a Retry-After header, in litellm_response_headers.
    assert response_headers(errors["openai"])["retry-after"] == "3"
    assert response_headers(errors["openai"])["retry-after-ms"] == "2500"
    anthropic = response_headers(errors["anthropic"])
    assert anthropic["retry-after"] == "3"
    assert anthropic["anthropic-ratelimit-requests-remaining"] == "0"
    assert "rate_limit_error" in str(errors["anthropic"])
    # Gemini: no header; the delay is the RetryInfo detail of the body, in the message.
    assert "retry-after" not in response_headers(errors["gemini"])
    assert "RESOURCE_EXHAUSTED" in str(errors["gemini"])
    assert '"retryDelay": "2.5s"' in str(errors["gemini"])
    assert server.stats()["faults"] == {"429": 3}
    assert server.stats()["completions"] == 0


@pytest.mark.parametrize(
    ("protocol", "outcome", "error", "status"),
    [
        ("openai", "500", litellm.InternalServerError, 500),
        ("openai", "503", litellm.ServiceUnavailableError, 503),
        ("anthropic", "500", litellm.InternalServerError, 500),
        # Anthropic's overload is a 529 overloaded_error; litellm reports it as a 500.
        ("anthropic", "503", litellm.InternalServerError, 500),
        ("gemini", "500", litellm.InternalServerError, 500),
        ("gemini", "503", litellm.ServiceUnavailableError, 503),
    ],
)
async def test_outages_are_litellm_transient_errors(
    server, protocol, outcome, error, status
) -> None:
    server.set_policy({"script": [outcome]})
    with pytest.raises(error) as caught:
        await ask(server, protocol)
    assert caught.value.status_code == status
    if protocol == "anthropic":
        kind = "api_error" if outcome == "500" else "overloaded_error"
        assert kind in str(caught.value)
    # The retry of the same request succeeds.
    SolvedAnswer.model_validate_json(content(await ask(server, protocol)))
    assert server.stats()["faults"] == {outcome: 1}


def test_anthropic_overload_is_a_529(server) -> None:
    server.set_policy({"script": ["503"]})
    body = {"model": "fake-a", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]}
    status, reply = post(server.api_base("anthropic") + "/v1/messages", body)
    assert status == 529
    assert reply == {
        "type": "error",
        "error": {
            "type": "overloaded_error",
            "message": "The engine is currently overloaded (fake model server).",
        },
    }


@pytest.mark.parametrize("protocol", ["anthropic", "gemini"])
async def test_a_hang_outlasts_the_client_timeout(server, protocol) -> None:
    server.set_policy({"script": ["hang"]})
    with pytest.raises(litellm.Timeout):
        await ask(server, protocol, timeout=0.5)
    SolvedAnswer.model_validate_json(content(await ask(server, protocol)))
    assert server.stats()["faults"] == {"hang": 1}


def test_bad_requests_get_a_clear_400_in_each_protocols_words(server) -> None:
    root = server.api_base("anthropic")
    status, body = post(root + "/v1/messages", {"model": "fake-a", "messages": []})
    assert status == 400 and body["type"] == "error"
    assert body["error"]["type"] == "invalid_request_error"
    assert "'max_tokens'" in body["error"]["message"]
    status, body = post(root + "/v1/messages", b"{not json")
    assert status == 400 and "not valid JSON" in body["error"]["message"]

    gemini = server.api_base("gemini") + "/models/fake-a"
    status, body = post(gemini + ":generateContent", {"contents": []})
    assert status == 400 and body["error"]["status"] == "INVALID_ARGUMENT"
    assert "'contents'" in body["error"]["message"]
    status, body = post(
        gemini + ":generateContent",
        {
            "contents": [{"parts": [{"text": "hi"}]}],
            "generationConfig": {"responseSchema": {"type": "OBJECT"}},
        },
    )
    assert status == 400 and "responseMimeType" in body["error"]["message"]
    status, body = post(gemini + ":streamGenerateContent", {"contents": []})
    assert status == 400 and "streamGenerateContent" in body["error"]["message"]
    assert server.stats()["faults"] == {"400": 5}
    assert server.stats()["completions"] == 0


# ---------------------------------------------------------------- response schemas


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_the_server_sees_the_schema_the_request_carries(server, protocol) -> None:
    model = schema_model(protocol)
    await ask(server, protocol, model=model, schema=SOLVED_SCHEMA)
    await ask(server, protocol, model=model)
    with_schema, without = server.received()
    assert with_schema.response_schema is not None
    assert with_schema.response_schema["required"] == SOLVED_SCHEMA["required"]
    assert set(with_schema.response_schema["properties"]) == set(SOLVED_SCHEMA["properties"])
    assert without.response_schema is None
    assert with_schema.protocol == without.protocol == protocol


async def test_anthropic_json_mode_is_a_forced_tool_or_output_format(server) -> None:
    # A name litellm does not know: the schema rides on a forced tool, the reply is a tool call.
    reply = await ask(server, "anthropic", schema=SOLVED_SCHEMA)
    SolvedAnswer.model_validate_json(content(reply))
    assert server.received()[-1].schema_tool == "json_tool_call"
    # A Claude model with structured outputs: output_format, the reply is JSON text.
    reply = await ask(server, "anthropic", model="claude-sonnet-4-5", schema=SOLVED_SCHEMA)
    SolvedAnswer.model_validate_json(content(reply))
    seen = server.received()[-1]
    assert seen.schema_tool is None and seen.response_schema is not None


async def test_gemini_schema_for_an_unknown_model_is_only_in_the_prompt(server) -> None:
    server.set_policy({"needs_schema": True})
    reply = await ask(server, "gemini", schema=SOLVED_SCHEMA)
    (seen,) = server.received()
    assert seen.response_schema is None
    assert "Use this JSON schema" in seen.texts[-1]
    with pytest.raises(ValidationError):
        SolvedAnswer.model_validate_json(content(reply))


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_needs_schema_is_malformed_without_one_and_well_formed_with_one(
    server, protocol
) -> None:
    model = schema_model(protocol)
    # Even a model that breaks its format on every free-form reply keeps it under a schema.
    server.set_policy({"needs_schema": True, "malformed": 1.0})
    for n in range(4):
        question = f"[q:0000001{n}:mc] What happens at 00:04?"
        reply = await ask(
            server, protocol, model=model, messages=messages(question), schema=SOLVED_SCHEMA
        )
        SolvedAnswer.model_validate_json(content(reply))
        reply = await ask(server, protocol, model=model, messages=messages(question))
        with pytest.raises(ValidationError):
            SolvedAnswer.model_validate_json(content(reply))
    assert server.stats()["faults"] == {"malformed": 4}


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_needs_schema_still_refuses_when_told_to(server, protocol) -> None:
    server.set_policy({"needs_schema": True, "script": ["refusal"]})
    reply = await ask(server, protocol, model=schema_model(protocol), schema=SOLVED_SCHEMA)
    assert reply.choices[0].finish_reason == "content_filter"
    assert server.stats()["faults"] == {"refusal": 1}


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_violate_schema_gives_json_that_breaks_the_schema(server, protocol) -> None:
    model = schema_model(protocol)
    server.set_policy({"violate_schema": 1.0})
    reply = await ask(server, protocol, model=model, schema=SOLVED_SCHEMA)
    broken = json.loads(content(reply))  # valid JSON ...
    assert set(broken) < set(SOLVED_SCHEMA["required"])  # ... with a required field left out
    with pytest.raises(ValidationError):
        SolvedAnswer.model_validate(broken)
    # Without a schema there is nothing to violate.
    SolvedAnswer.model_validate_json(content(await ask(server, protocol, model=model)))
    assert server.stats()["faults"] == {"schema_violation": 1}


async def test_vllm_structured_outputs_and_guided_json_are_schemas(server) -> None:
    await ask(server, "openai", extra_body={"structured_outputs": {"json": SOLVED_SCHEMA}})
    await ask(server, "openai", extra_body={"guided_json": json.dumps(SOLVED_SCHEMA)})
    assert [r.response_schema for r in server.received()] == [SOLVED_SCHEMA, SOLVED_SCHEMA]


async def test_a_schema_that_is_not_an_object_is_a_clear_400(server) -> None:
    with pytest.raises(litellm.BadRequestError, match="guided_json"):
        await ask(server, "openai", extra_body={"guided_json": "[1, 2"})
    assert server.stats()["faults"] == {"400": 1}


def test_schema_knobs_are_validated() -> None:
    with pytest.raises(InputError, match="violate_schema"):
        FakeModelServer(policy={"violate_schema": 1.5})
    with pytest.raises(InputError, match="needs_schema"):
        FakeModelServer(policy={"models": {"fake-a": {"needs_schema": "sometimes"}}})
    with pytest.raises(InputError, match="blocked"):
        FakeModelServer(policy={"blocked": -0.1})


# ---------------------------------------------------------------- pools


async def test_write_pool_reaches_each_model_on_its_protocol(server, tmp_path, monkeypatch) -> None:
    pool_file = write_pool(
        tmp_path / "pool.yaml",
        server.base_url,
        protocols={"fake-b": "anthropic", "fake-c": "gemini"},
    )
    monkeypatch.setenv(fake_server.API_KEY_ENV, API_KEY)
    pool = load_pool(pool_file)
    by_name = {spec.name: spec for spec in pool.models}
    assert by_name["fake-a"].model == "openai/fake-a"
    assert by_name["fake-b"].model == "anthropic/fake-b"
    assert by_name["fake-c"].model == "gemini/fake-c"
    assert by_name["fake-b"].api_base == server.base_url.removesuffix("/v1")
    assert len({spec.input_cost_per_token for spec in pool.models}) == 1
    for spec in pool.models:
        reply = await litellm.acompletion(
            model=spec.model,
            api_base=spec.api_base,
            api_key=spec.api_key(),
            messages=messages(),
            max_tokens=256,
            extra_headers={"X-Vkr-Step": "self_consistency"},
        )
        SolvedAnswer.model_validate_json(content(reply))
    assert server.stats()["by_protocol"] == {"anthropic": 1, "gemini": 1, "openai": 2}


def test_write_pool_without_protocols_is_unchanged(tmp_path: Path) -> None:
    plain = write_pool(tmp_path / "a.yaml", "http://127.0.0.1:9/v1")
    same = write_pool(tmp_path / "b.yaml", "http://127.0.0.1:9/v1", protocols={})
    assert plain.read_text() == same.read_text().replace("b-registry", "a-registry")
    entries = yaml.safe_load(plain.read_text())["models"]
    assert {e["model"] for e in entries} == {f"openai/{n}" for n in fake_server.DEFAULT_MODELS}


def test_write_pool_rejects_unknown_protocols_and_models(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="'fake-a' has protocol 'bedrock'"):
        write_pool(tmp_path / "p.yaml", "http://127.0.0.1:9/v1", protocols={"fake-a": "bedrock"})
    with pytest.raises(InputError, match="not in the pool"):
        write_pool(tmp_path / "p.yaml", "http://127.0.0.1:9/v1", protocols={"fake-z": "gemini"})


def test_cli_help_names_the_protocols_and_checks_protocol_choices(tmp_path: Path) -> None:
    import click

    @click.group()
    def root() -> None:
        """A fresh root group, so this test leaves the real ``cli`` untouched."""

    fake_server.vkr_register_commands(cli=root)
    result = CliRunner().invoke(root, ["dev", "fake-server", "--help"])
    assert result.exit_code == 0
    for words in ("OpenAI chat completions", "Anthropic Messages", "Gemini generateContent"):
        assert words in result.output
    result = CliRunner().invoke(
        root,
        ["dev", "fake-server", "--write-pool", str(tmp_path / "p.yaml"), "--protocol", "fake-a"],
    )
    assert result.exit_code == 2 and "MODEL=PROTOCOL" in result.output
