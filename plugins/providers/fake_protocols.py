"""The wire protocols of the fake model server: OpenAI chat completions, Anthropic Messages and
Gemini generateContent.

Each protocol parses its request into one :class:`ChatRequest` and renders the server's one
:class:`Answer`, and its faults, in its own words. The server decides what to say once, from the
ChatRequest alone, so content, policy and stats are the same whichever protocol a request came
in on; only the envelope differs. The shapes are the ones litellm 1.110.2 sends and reads for
``openai/``, ``anthropic/`` and ``gemini/`` models with ``api_base`` set.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import json
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, ClassVar

from vkr_core.schemas import VkrError

__all__ = [
    "PROTOCOLS",
    "Answer",
    "AnthropicProtocol",
    "BadRequest",
    "ChatRequest",
    "Fault",
    "GeminiProtocol",
    "OpenAIProtocol",
    "Protocol",
    "Rendered",
    "parse_chat_request",
]

PROTOCOLS: tuple[str, ...] = ("openai", "anthropic", "gemini")
REFUSAL_TEXT = "I'm sorry, but I can't help with that request."
# The tool litellm forces on Anthropic models to get JSON by schema (RESPONSE_FORMAT_TOOL_NAME).
ANTHROPIC_JSON_TOOL = "json_tool_call"


# ---------------------------------------------------------------- the request, protocol-free


@dataclass
class ChatRequest:
    """The parts of a chat request that decide the reply, whatever protocol carried it."""

    model: str
    step: str
    texts: list[str]
    image_hashes: list[str]
    seed: int | None
    normalised_messages: list[dict[str, Any]]
    # The JSON schema the request asked the reply to follow, from the protocol's native form.
    response_schema: dict[str, Any] | None = None
    protocol: str = "openai"
    # Anthropic's JSON mode: the reply is a call of this tool whose input is the JSON object.
    schema_tool: str | None = None

    def text_chars(self) -> int:
        return sum(len(t) for t in self.texts)


class BadRequest(VkrError):
    """A request the server answers with HTTP 400."""


@functools.lru_cache(maxsize=1024)  # a video's frames come again in each of its calls
def _sha256_of_base64(data: str) -> str | None:
    try:
        return hashlib.sha256(base64.b64decode(data, validate=False)).hexdigest()
    except (binascii.Error, ValueError):
        return None


def _image_hash(url: str) -> str:
    # Hash the decoded bytes of a data URL so the hash matches the frame file's own sha256.
    if url.startswith("data:") and "," in url:
        header, payload = url.split(",", 1)
        if header.endswith(";base64"):
            digest = _sha256_of_base64(payload)
            if digest is not None:
                return digest
    return hashlib.sha256(url.encode()).hexdigest()


def _schema_object(value: Any, where: str) -> dict[str, Any]:
    # vLLM takes guided_json as a JSON string as well as an object.
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise BadRequest(f"{where} is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise BadRequest(f"{where} must be a JSON schema object, got {type(value).__name__}")
    return value


def _model_name(value: Any, prefix: str) -> str:
    if not isinstance(value, str) or not value:
        raise BadRequest("'model' is required and must be a non-empty string")
    return value.removeprefix(prefix)


def _seed(value: Any, where: str) -> int | None:
    if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
        raise BadRequest(f"{where} must be an integer, got {value!r}")
    return value


class _Digest:
    """Accumulates the texts, image hashes and normalised messages of one request."""

    def __init__(self) -> None:
        self.texts: list[str] = []
        self.images: list[str] = []
        self.messages: list[dict[str, Any]] = []

    def message(self, role: str) -> list[dict[str, Any]]:
        parts: list[dict[str, Any]] = []
        self.messages.append({"role": role, "content": parts})
        return parts

    def text(self, parts: list[dict[str, Any]], text: Any) -> None:
        value = str(text)
        self.texts.append(value)
        parts.append({"text": value})

    def image(self, parts: list[dict[str, Any]], digest: str) -> None:
        self.images.append(digest)
        parts.append({"image": digest})


# ---------------------------------------------------------------- the answer, protocol-free


@dataclass(frozen=True)
class Answer:
    """What the server decided to reply, before any protocol words it.

    ``kind`` is ``ok``, ``malformed``, ``schema_violation``, ``refusal`` (the model declines
    to answer) or ``blocked`` (the prompt itself is refused before any answer: Gemini's
    ``promptFeedback.blockReason``; protocols without that form word it as a refusal).
    Token counts use one formula for every protocol, so cost accounting matches.
    """

    model: str
    text: str
    kind: str
    prompt_tokens: int
    completion_tokens: int
    reply_id: str

    @property
    def declined(self) -> bool:
        return self.kind in ("refusal", "blocked")


@dataclass(frozen=True)
class Fault:
    """A transport fault to render: ``bad_request`` (400), ``rate_limit`` (429),
    ``server_error`` (500), ``overloaded`` (503; Anthropic's 529) or ``timeout`` (504)."""

    kind: str
    message: str
    retry_after_s: float = 0.0


@dataclass(frozen=True)
class Rendered:
    status: int
    body: dict[str, Any]
    headers: dict[str, str]


def _bearer(header: str | None) -> str | None:
    # The same key sent as a bearer token (OpenAI) and bare (Anthropic, Gemini) is one key.
    return header.removeprefix("Bearer ").strip() or None if header else None


def _json_object(text: str) -> dict[str, Any] | None:
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


class Protocol:
    """One wire protocol: where its credential travels, how it asks, how it is answered."""

    name: ClassVar[str]

    def credential(self, headers: Mapping[str, str], query: Mapping[str, str]) -> str | None:
        """The API key the request carries, bare (no ``Bearer``), or None."""
        raise NotImplementedError

    def parse(self, body: Any, step_header: str | None, path_model: str | None) -> ChatRequest:
        """Validate a request body or raise BadRequest naming the field."""
        raise NotImplementedError

    def reply(self, chat: ChatRequest, answer: Answer) -> dict[str, Any]:
        raise NotImplementedError

    def fault(self, fault: Fault) -> Rendered:
        raise NotImplementedError


# ---------------------------------------------------------------- OpenAI chat completions


def openai_response_schema(body: dict[str, Any]) -> dict[str, Any] | None:
    """The schema of an OpenAI ``response_format`` json_schema, or of vLLM's structured outputs."""
    response_format = body.get("response_format")
    if isinstance(response_format, dict) and response_format.get("type") == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict) or "schema" not in spec:
            raise BadRequest("'response_format.json_schema.schema' is required for json_schema")
        return _schema_object(spec["schema"], "'response_format.json_schema.schema'")
    structured = body.get("structured_outputs")
    if isinstance(structured, dict) and structured.get("json") is not None:
        return _schema_object(structured["json"], "'structured_outputs.json'")
    if body.get("guided_json") is not None:
        return _schema_object(body["guided_json"], "'guided_json'")
    return None


def parse_chat_request(body: Any, step_header: str | None) -> ChatRequest:
    """Validate an OpenAI chat-completions body or raise BadRequest naming the field."""
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    model = _model_name(body.get("model"), "openai/")
    if body.get("stream"):
        raise BadRequest("'stream': true is not supported by the fake model server")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' is required and must be a non-empty list")
    seed = _seed(body.get("seed"), "'seed'")
    digest = _Digest()
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message:
            raise BadRequest(f"messages[{i}] must be an object with a 'role'")
        content = message.get("content")
        parts = digest.message(message["role"])
        if isinstance(content, str):
            digest.text(parts, content)
        elif isinstance(content, list):
            for j, part in enumerate(content):
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text":
                    digest.text(parts, part.get("text", ""))
                elif kind == "image_url":
                    image = part.get("image_url")
                    url = image.get("url") if isinstance(image, dict) else image
                    if not isinstance(url, str) or not url:
                        raise BadRequest(f"messages[{i}].content[{j}].image_url has no url")
                    digest.image(parts, _image_hash(url))
                else:
                    raise BadRequest(
                        f"messages[{i}].content[{j}] has unsupported type {kind!r} "
                        "(expected 'text' or 'image_url')"
                    )
        elif content is not None:
            raise BadRequest(f"messages[{i}].content must be a string or a list of parts")
    return ChatRequest(
        model=model,
        step=step_header or "(none)",
        texts=digest.texts,
        image_hashes=digest.images,
        seed=seed,
        normalised_messages=digest.messages,
        response_schema=openai_response_schema(body),
        protocol="openai",
    )


def openai_error(message: str, kind: str, code: str | None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


class OpenAIProtocol(Protocol):
    name = "openai"

    def credential(self, headers: Mapping[str, str], query: Mapping[str, str]) -> str | None:
        return _bearer(headers.get("Authorization"))

    def parse(self, body: Any, step_header: str | None, path_model: str | None) -> ChatRequest:
        return parse_chat_request(body, step_header)

    def reply(self, chat: ChatRequest, answer: Answer) -> dict[str, Any]:
        return {
            "id": f"chatcmpl-fake-{answer.reply_id}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": answer.model,
            "system_fingerprint": "vkr-fake-model-server",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": answer.text},
                    "finish_reason": "content_filter" if answer.declined else "stop",
                    "logprobs": None,
                }
            ],
            "usage": {
                "prompt_tokens": answer.prompt_tokens,
                "completion_tokens": answer.completion_tokens,
                "total_tokens": answer.prompt_tokens + answer.completion_tokens,
            },
        }

    def fault(self, fault: Fault) -> Rendered:
        if fault.kind == "bad_request":
            return Rendered(400, openai_error(fault.message, "invalid_request_error", None), {})
        if fault.kind == "rate_limit":
            return Rendered(
                429,
                openai_error(fault.message, "requests", "rate_limit_exceeded"),
                {
                    "Retry-After": str(math.ceil(fault.retry_after_s)),
                    "retry-after-ms": str(int(fault.retry_after_s * 1000)),
                },
            )
        status = {"server_error": 500, "overloaded": 503, "timeout": 504}[fault.kind]
        return Rendered(status, openai_error(fault.message, "server_error", None), {})


# ---------------------------------------------------------------- Anthropic Messages


def _anthropic_schema(body: dict[str, Any]) -> tuple[dict[str, Any] | None, str | None]:
    """The schema and, in tool mode, the tool that carries the reply.

    litellm sends ``output_format`` (structured outputs) for Claude models it knows support
    it, and a forced ``json_tool_call`` tool for any other name; ``output_config.format`` is
    the newer spelling of ``output_format``.
    """
    output_format = body.get("output_format")
    output_config = body.get("output_config")
    if not isinstance(output_format, dict) and isinstance(output_config, dict):
        output_format = output_config.get("format")
    if isinstance(output_format, dict) and output_format.get("type") == "json_schema":
        if "schema" not in output_format:
            raise BadRequest("'output_format.schema' is required for type json_schema")
        return _schema_object(output_format["schema"], "'output_format.schema'"), None
    tools = body.get("tools")
    if not isinstance(tools, list):
        return None, None
    choice = body.get("tool_choice")
    forced = (
        choice.get("name") if isinstance(choice, dict) and choice.get("type") == "tool" else None
    )
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict):
            raise BadRequest(f"tools[{i}] must be an object")
        if tool.get("name") in (forced, ANTHROPIC_JSON_TOOL):
            if "input_schema" not in tool:
                raise BadRequest(f"tools[{i}].input_schema is required")
            schema = _schema_object(tool["input_schema"], f"tools[{i}].input_schema")
            return schema, str(tool["name"])
    if forced is not None:
        raise BadRequest(f"tool_choice names {forced!r}, which is not in 'tools'")
    return None, None


def anthropic_error(kind: str, message: str) -> dict[str, Any]:
    return {"type": "error", "error": {"type": kind, "message": message}}


class AnthropicProtocol(Protocol):
    name = "anthropic"
    # Requests per minute the rate-limit headers advertise; nothing enforces it.
    RATE_LIMIT: ClassVar[int] = 50

    def credential(self, headers: Mapping[str, str], query: Mapping[str, str]) -> str | None:
        return headers.get("x-api-key") or _bearer(headers.get("Authorization"))

    def parse(self, body: Any, step_header: str | None, path_model: str | None) -> ChatRequest:
        if not isinstance(body, dict):
            raise BadRequest("the request body must be a JSON object")
        model = _model_name(body.get("model"), "anthropic/")
        if body.get("stream"):
            raise BadRequest("'stream': true is not supported by the fake model server")
        max_tokens = body.get("max_tokens")
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
            raise BadRequest("'max_tokens' is required and must be a positive integer")
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise BadRequest("'messages' is required and must be a non-empty list")
        digest = _Digest()
        system = body.get("system")
        if system is not None:
            parts = digest.message("system")
            if isinstance(system, str):
                digest.text(parts, system)
            elif isinstance(system, list):
                for j, block in enumerate(system):
                    if not isinstance(block, dict) or block.get("type") != "text":
                        raise BadRequest(f"system[{j}] must be a text block")
                    digest.text(parts, block.get("text", ""))
            else:
                raise BadRequest("'system' must be a string or a list of text blocks")
        for i, message in enumerate(messages):
            role = message.get("role") if isinstance(message, dict) else None
            if role not in ("user", "assistant"):
                raise BadRequest(f"messages[{i}].role must be 'user' or 'assistant'")
            parts = digest.message(role)
            content = message.get("content")
            if isinstance(content, str):
                digest.text(parts, content)
                continue
            if not isinstance(content, list):
                raise BadRequest(f"messages[{i}].content must be a string or a list of blocks")
            for j, block in enumerate(content):
                kind = block.get("type") if isinstance(block, dict) else None
                if kind == "text":
                    digest.text(parts, block.get("text", ""))
                elif kind == "image":
                    digest.image(
                        parts, self._image(block.get("source"), f"messages[{i}].content[{j}]")
                    )
                else:
                    raise BadRequest(
                        f"messages[{i}].content[{j}] has unsupported type {kind!r} "
                        "(expected 'text' or 'image')"
                    )
        schema, tool = _anthropic_schema(body)
        return ChatRequest(
            model=model,
            step=step_header or "(none)",
            texts=digest.texts,
            image_hashes=digest.images,
            seed=None,  # the Messages API has no seed
            normalised_messages=digest.messages,
            response_schema=schema,
            protocol=self.name,
            schema_tool=tool,
        )

    @staticmethod
    def _image(source: Any, where: str) -> str:
        if not isinstance(source, dict):
            raise BadRequest(f"{where}.source is required for an image block")
        if source.get("type") == "base64":
            data = source.get("data")
            if not isinstance(data, str) or not source.get("media_type"):
                raise BadRequest(f"{where}.source needs 'media_type' and 'data'")
            digest = _sha256_of_base64(data)
            if digest is None:
                raise BadRequest(f"{where}.source.data is not valid base64")
            return digest
        if source.get("type") == "url" and isinstance(source.get("url"), str):
            return hashlib.sha256(source["url"].encode()).hexdigest()
        raise BadRequest(f"{where}.source.type must be 'base64' or 'url'")

    def reply(self, chat: ChatRequest, answer: Answer) -> dict[str, Any]:
        content: list[dict[str, Any]]
        obj = _json_object(answer.text) if chat.schema_tool and not answer.declined else None
        if obj is not None:
            content = [
                {
                    "type": "tool_use",
                    "id": f"toolu_fake{answer.reply_id[:20]}",
                    "name": chat.schema_tool,
                    "input": obj,
                }
            ]
            stop_reason = "tool_use"
        else:
            content = [{"type": "text", "text": answer.text}]
            stop_reason = "refusal" if answer.declined else "end_turn"
        return {
            "id": f"msg_fake{answer.reply_id}",
            "type": "message",
            "role": "assistant",
            "model": answer.model,
            "content": content,
            "stop_reason": stop_reason,
            "stop_sequence": None,
            "usage": {
                "input_tokens": answer.prompt_tokens,
                "output_tokens": answer.completion_tokens,
            },
        }

    def fault(self, fault: Fault) -> Rendered:
        if fault.kind == "bad_request":
            return Rendered(400, anthropic_error("invalid_request_error", fault.message), {})
        if fault.kind == "rate_limit":
            reset = datetime.now(UTC) + timedelta(seconds=fault.retry_after_s)
            reset_text = reset.replace(microsecond=0).isoformat().replace("+00:00", "Z")
            return Rendered(
                429,
                anthropic_error("rate_limit_error", fault.message),
                {
                    "retry-after": str(math.ceil(fault.retry_after_s)),
                    "anthropic-ratelimit-requests-limit": str(self.RATE_LIMIT),
                    "anthropic-ratelimit-requests-remaining": "0",
                    "anthropic-ratelimit-requests-reset": reset_text,
                },
            )
        status, kind = {
            "server_error": (500, "api_error"),
            "overloaded": (529, "overloaded_error"),
            "timeout": (504, "timeout_error"),
        }[fault.kind]
        return Rendered(status, anthropic_error(kind, fault.message), {})


# ---------------------------------------------------------------- Gemini generateContent


def _either(mapping: Mapping[str, Any], camel: str, snake: str) -> Any:
    # Google's JSON parser takes lowerCamelCase and snake_case alike; litellm sends both kinds.
    value = mapping.get(camel)
    return mapping.get(snake) if value is None else value


_GEMINI_STATUS: dict[int, str] = {
    400: "INVALID_ARGUMENT",
    429: "RESOURCE_EXHAUSTED",
    500: "INTERNAL",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}


def gemini_error(code: int, message: str, details: list[dict[str, Any]] | None = None) -> dict:
    error: dict[str, Any] = {"code": code, "message": message, "status": _GEMINI_STATUS[code]}
    if details:
        error["details"] = details
    return {"error": error}


class GeminiProtocol(Protocol):
    name = "gemini"
    _SAFETY_RATINGS: ClassVar[list[dict[str, Any]]] = [
        {"category": "HARM_CATEGORY_DANGEROUS_CONTENT", "probability": "HIGH", "blocked": True},
        {"category": "HARM_CATEGORY_HARASSMENT", "probability": "NEGLIGIBLE"},
    ]

    def credential(self, headers: Mapping[str, str], query: Mapping[str, str]) -> str | None:
        return headers.get("x-goog-api-key") or query.get("key")

    def parse(self, body: Any, step_header: str | None, path_model: str | None) -> ChatRequest:
        if not path_model:
            raise BadRequest("the URL names no model: POST .../models/{model}:generateContent")
        if not isinstance(body, dict):
            raise BadRequest("the request body must be a JSON object")
        contents = body.get("contents")
        if not isinstance(contents, list) or not contents:
            raise BadRequest("'contents' is required and must be a non-empty list")
        digest = _Digest()
        system = _either(body, "systemInstruction", "system_instruction")
        if system is not None:
            if not isinstance(system, dict) or not isinstance(system.get("parts"), list):
                raise BadRequest("'systemInstruction' must be an object with 'parts'")
            self._parts(digest, digest.message("system"), system["parts"], "systemInstruction")
        for i, item in enumerate(contents):
            if not isinstance(item, dict) or not isinstance(item.get("parts"), list):
                raise BadRequest(f"contents[{i}] must be an object with a list of 'parts'")
            role = item.get("role", "user")
            if role not in ("user", "model"):
                raise BadRequest(f"contents[{i}].role must be 'user' or 'model', not {role!r}")
            parts = digest.message("assistant" if role == "model" else "user")
            self._parts(digest, parts, item["parts"], f"contents[{i}]")
        config = _either(body, "generationConfig", "generation_config") or {}
        if not isinstance(config, dict):
            raise BadRequest("'generationConfig' must be an object")
        return ChatRequest(
            model=path_model.removeprefix("models/"),
            step=step_header or "(none)",
            texts=digest.texts,
            image_hashes=digest.images,
            seed=_seed(config.get("seed"), "'generationConfig.seed'"),
            normalised_messages=digest.messages,
            response_schema=self._schema(config),
            protocol=self.name,
        )

    @staticmethod
    def _parts(digest: _Digest, parts: list[dict[str, Any]], given: list[Any], where: str) -> None:
        for j, part in enumerate(given):
            if not isinstance(part, dict):
                raise BadRequest(f"{where}.parts[{j}] must be an object")
            inline = _either(part, "inlineData", "inline_data")
            file_data = _either(part, "fileData", "file_data")
            if "text" in part:
                digest.text(parts, part["text"])
            elif isinstance(inline, dict):
                data = inline.get("data")
                if not isinstance(data, str) or not _either(inline, "mimeType", "mime_type"):
                    raise BadRequest(f"{where}.parts[{j}].inlineData needs 'mimeType' and 'data'")
                image = _sha256_of_base64(data)
                if image is None:
                    raise BadRequest(f"{where}.parts[{j}].inlineData.data is not valid base64")
                digest.image(parts, image)
            elif isinstance(file_data, dict):
                uri = str(_either(file_data, "fileUri", "file_uri") or "")
                digest.image(parts, hashlib.sha256(uri.encode()).hexdigest())
            else:
                raise BadRequest(
                    f"{where}.parts[{j}] is not supported (expected 'text', 'inlineData' "
                    "or 'fileData')"
                )

    @staticmethod
    def _schema(config: dict[str, Any]) -> dict[str, Any] | None:
        schema = _either(config, "responseJsonSchema", "response_json_schema")
        where = "'generationConfig.responseJsonSchema'"
        if schema is None:
            schema = _either(config, "responseSchema", "response_schema")
            where = "'generationConfig.responseSchema'"
        if schema is None:
            return None
        mime = _either(config, "responseMimeType", "response_mime_type")
        if mime != "application/json":
            # As Google does: a schema only constrains a JSON reply.
            raise BadRequest(f"{where} needs responseMimeType 'application/json', got {mime!r}")
        return _schema_object(schema, where)

    def _usage(self, answer: Answer, completion: int) -> dict[str, Any]:
        return {
            "promptTokenCount": answer.prompt_tokens,
            "candidatesTokenCount": completion,
            "totalTokenCount": answer.prompt_tokens + completion,
        }

    def reply(self, chat: ChatRequest, answer: Answer) -> dict[str, Any]:
        envelope: dict[str, Any] = {
            "modelVersion": answer.model,
            "responseId": f"fake{answer.reply_id}",
        }
        if answer.kind == "blocked":
            # The prompt is refused as a whole: no candidate, no output tokens.
            envelope["promptFeedback"] = {
                "blockReason": "SAFETY",
                "safetyRatings": self._SAFETY_RATINGS,
            }
            envelope["usageMetadata"] = self._usage(answer, 0)
            return envelope
        candidate: dict[str, Any] = {"index": 0}
        if answer.kind == "refusal":
            candidate.update({"finishReason": "SAFETY", "safetyRatings": self._SAFETY_RATINGS})
        else:
            candidate["content"] = {"role": "model", "parts": [{"text": answer.text}]}
            candidate["finishReason"] = "STOP"
        envelope["candidates"] = [candidate]
        envelope["usageMetadata"] = self._usage(answer, answer.completion_tokens)
        return envelope

    def fault(self, fault: Fault) -> Rendered:
        if fault.kind == "bad_request":
            return Rendered(400, gemini_error(400, fault.message), {})
        if fault.kind == "rate_limit":
            # Google puts the delay in the body only (RetryInfo), never in a Retry-After header.
            details: list[dict[str, Any]] = [
                {
                    "@type": "type.googleapis.com/google.rpc.QuotaFailure",
                    "violations": [
                        {
                            "quotaMetric": "generativelanguage.googleapis.com/"
                            "generate_content_requests",
                            "quotaId": "GenerateRequestsPerMinutePerProjectPerModel",
                        }
                    ],
                },
                {
                    "@type": "type.googleapis.com/google.rpc.RetryInfo",
                    "retryDelay": f"{fault.retry_after_s:g}s",
                },
            ]
            return Rendered(429, gemini_error(429, fault.message, details), {})
        status = {"server_error": 500, "overloaded": 503, "timeout": 504}[fault.kind]
        return Rendered(status, gemini_error(status, fault.message), {})


PROTOCOL_HANDLERS: dict[str, Protocol] = {
    p.name: p for p in (OpenAIProtocol(), AnthropicProtocol(), GeminiProtocol())
}
