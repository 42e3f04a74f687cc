"""The fake model server's three protocols (OpenAI, Anthropic Messages, Gemini generateContent),
each exercised through the real litellm client over HTTP."""

from __future__ import annotations

import base64
import io
import json
import os
from typing import Any

os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"

import litellm  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402
from pydantic import ValidationError  # noqa: E402

from plugins.providers.fake_server import FakeModelServer  # noqa: E402
from plugins.steps.schemas import SolvedAnswer  # noqa: E402
from vkr_core.schemas import InputError  # noqa: E402

litellm.suppress_debug_info = True

PROTOCOLS = ("openai",)
SOLVED_SCHEMA = SolvedAnswer.model_json_schema()


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


def messages(question: str = "[q:0000000a:mc] What happens at 00:04?") -> list[dict[str, Any]]:
    return [
        {"role": "system", "content": "You answer questions about videos. Reply in JSON."},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": f"Question: {question}"},
                {"type": "text", "text": "Frame at 00:04:"},
                {"type": "image_url", "image_url": {"url": FRAME_URL}},
            ],
        },
    ]


def route(server: FakeModelServer, protocol: str, model: str) -> dict[str, Any]:
    """The litellm model name and api_base that reach ``server`` on ``protocol``."""
    assert server.base_url is not None
    return {"model": f"{protocol}/{model}", "api_base": server.base_url}


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
    return await litellm.acompletion(
        **route(server, protocol, model),
        api_key="sk-test-not-a-real-key",
        temperature=0.0,
        max_tokens=512,
        max_retries=0,
        extra_headers={"X-Vkr-Step": step, "X-Vkr-Call": f"call-{step}-{model}"},
        **kwargs,
    )


def content(reply: Any) -> str:
    return reply.choices[0].message.content


# ---------------------------------------------------------------- response schemas


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_the_server_sees_the_schema_the_request_carries(server, protocol) -> None:
    await ask(server, protocol, schema=SOLVED_SCHEMA)
    await ask(server, protocol)
    with_schema, without = server.received()
    assert with_schema.response_schema is not None
    assert with_schema.response_schema["required"] == SOLVED_SCHEMA["required"]
    assert without.response_schema is None
    assert with_schema.protocol == without.protocol == protocol


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_needs_schema_is_malformed_without_one_and_well_formed_with_one(
    server, protocol
) -> None:
    # Even a model that breaks its format on every free-form reply keeps it under a schema.
    server.set_policy({"needs_schema": True, "malformed": 1.0})
    for seed in range(4):
        question = f"[q:0000001{seed}:mc] What happens at 00:04?"
        reply = await ask(server, protocol, messages=messages(question), schema=SOLVED_SCHEMA)
        SolvedAnswer.model_validate_json(content(reply))
        reply = await ask(server, protocol, messages=messages(question))
        with pytest.raises(ValidationError):
            SolvedAnswer.model_validate_json(content(reply))
    assert server.stats()["faults"] == {"malformed": 4}


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_needs_schema_still_refuses_when_told_to(server, protocol) -> None:
    server.set_policy({"needs_schema": True, "script": ["refusal"]})
    await ask_refused(server, protocol)
    assert server.stats()["faults"] == {"refusal": 1}


async def ask_refused(server: FakeModelServer, protocol: str) -> None:
    reply = await ask(server, protocol, schema=SOLVED_SCHEMA)
    assert reply.choices[0].finish_reason == "content_filter"


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_violate_schema_gives_json_that_breaks_the_schema(server, protocol) -> None:
    server.set_policy({"violate_schema": 1.0})
    reply = await ask(server, protocol, schema=SOLVED_SCHEMA)
    broken = json.loads(content(reply))  # valid JSON ...
    assert set(broken) < set(SOLVED_SCHEMA["required"])  # ... with a required field left out
    with pytest.raises(ValidationError):
        SolvedAnswer.model_validate(broken)
    # Without a schema there is nothing to violate.
    SolvedAnswer.model_validate_json(content(await ask(server, protocol)))
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
