"""The step contract: ``Step[In, Out]``, and the generator and gate kinds of step.

A step turns its input into chat messages (``format_input``) and a model's reply into its
output schema (``format_output``); the engine (``StepContext.call`` / ``StepContext.run``)
routes, calls, caches, retries and records in between. A reply that does not parse becomes
a recorded rejection with the raw text kept, never a crash.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Generic, Literal, TypeVar

from pydantic import BaseModel, ValidationError

from vkr_core.errors import describe_validation_error
from vkr_core.schemas import Candidate, SkillSpec, Verdict, VkrError

if TYPE_CHECKING:
    from vkr_core.context import StepContext

In = TypeVar("In")
Out = TypeVar("Out", bound=BaseModel)
Parsed = TypeVar("Parsed", bound=BaseModel)


class ReplyError(VkrError):
    """A model reply that cannot be used: malformed (hard compliance failure) or a refusal."""

    def __init__(
        self, kind: Literal["malformed", "refusal", "error"], reason: str, raw: str | None
    ):
        super().__init__(reason)
        self.kind = kind
        self.reason = reason
        self.raw = raw


_FENCE = re.compile(r"```(?:json)?\s*(.*?)```", re.DOTALL)


def extract_json(text: str) -> Any:
    """The JSON object in a reply: bare, inside a ```json fence, or the outermost {...}."""
    candidates = [text.strip()]
    candidates += [m.strip() for m in _FENCE.findall(text)]
    start, end = text.find("{"), text.rfind("}")
    if 0 <= start < end:
        candidates.append(text[start : end + 1])
    for candidate in candidates:
        try:
            return json.loads(candidate)
        except (json.JSONDecodeError, ValueError):
            continue
    raise ValueError("no JSON object found in the reply")


class Prompt:
    """A versioned prompt template file next to the step that uses it.

    The version is the declared one plus a hash of the template text, so editing the
    file changes every cache key even if nobody bumps the number.
    """

    def __init__(self, path: Path, declared_version: str):
        self.path = path
        self.text = path.read_text()
        digest = hashlib.sha256(self.text.encode()).hexdigest()[:8]
        self.version = f"{declared_version}-{digest}"

    def render(self, **values: Any) -> str:
        return self.text.format(**values)


def parse_reply(schema: type[Parsed], text: str) -> Parsed:
    """A reply parsed into ``schema``, or ReplyError('malformed') naming its problems."""
    try:
        return schema.model_validate(extract_json(text))
    except ValidationError as exc:
        raise ReplyError("malformed", describe_validation_error(exc), text) from None
    except ValueError as exc:
        raise ReplyError("malformed", str(exc), text) from None


@functools.cache
def schema_digest(schema: type[BaseModel]) -> str:
    """A short hash of a schema's JSON Schema (field names, types, constraints, docs)."""
    text = json.dumps(schema.model_json_schema(), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:8]


# Annotations a model needs not see: pydantic's generated titles, defaults (OpenAI's strict
# mode refuses them; the reply is validated against the pydantic model anyway), examples,
# and the OpenAPI discriminator, whose mapping names the $defs that inlining removes.
_DROPPED_KEYWORDS = frozenset({"title", "default", "examples", "discriminator", "$schema"})
# Keywords whose value is data (or names), never a schema to walk into.
_DATA_KEYWORDS = frozenset(
    {"enum", "const", "required", "description", "pattern", "format", "type", "$comment"}
)
# Keywords that hold a map of names to schemas.
_SCHEMA_MAPS = frozenset({"properties", "patternProperties", "dependentSchemas"})
# The JSON Schema subset OpenAI's strict mode documents (Structured Outputs, "Supported
# schemas"; minLength/maxLength are documented as unsupported for fine-tuned models only).
# A schema outside it (an optional field, allOf, an open object) is sent with strict off.
_STRICT_KEYWORDS = frozenset(
    {
        "type",
        "properties",
        "required",
        "additionalProperties",
        "items",
        "enum",
        "anyOf",
        "description",
        "pattern",
        "format",
        "multipleOf",
        "maximum",
        "exclusiveMaximum",
        "minimum",
        "exclusiveMinimum",
        "minItems",
        "maxItems",
        "minLength",
        "maxLength",
    }
)
_STRICT_MAX_OBJECT_DEPTH = 10


def _inline(node: Any, defs: dict[str, Any], seen: tuple[str, ...], owner: str) -> Any:
    """A schema node with its ``$ref``s replaced by their definitions, annotations dropped."""
    if isinstance(node, list):
        return [_inline(item, defs, seen, owner) for item in node]
    if not isinstance(node, dict):
        return node
    if isinstance(node.get("$ref"), str):
        name = node["$ref"].rsplit("/", 1)[-1]
        if name in seen or name not in defs:
            why = "refers to itself" if name in seen else "has a reference vkr cannot resolve"
            raise VkrError(
                f"the output schema {owner} {why} ({node['$ref']}): it cannot be sent as a "
                "response schema; set structured_output = False on the step"
            )
        target = _inline(defs[name], defs, (*seen, name), owner)
        siblings = {k: v for k, v in node.items() if k != "$ref"}
        # A field's own description says more than its type's.
        return {**target, **_inline(siblings, defs, seen, owner)}
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _DROPPED_KEYWORDS or key in ("$defs", "definitions"):
            continue
        if key in _DATA_KEYWORDS:
            out[key] = value
        elif key in _SCHEMA_MAPS and isinstance(value, dict):
            out[key] = {name: _inline(sub, defs, seen, owner) for name, sub in value.items()}
        elif key == "oneOf":
            # Anthropic and OpenAI's strict mode refuse oneOf; any branch is validated after.
            out["anyOf"] = _inline(value, defs, seen, owner)
        else:
            out[key] = _inline(value, defs, seen, owner)
    if "const" in out and "enum" not in out:
        # Gemini's schema has no const; a one-value enum says the same everywhere.
        out["enum"] = [out.pop("const")]
    return out


def _is_strict(node: Any, depth: int = 0) -> bool:
    """Whether a (portable) schema node keeps to OpenAI's strict-mode rules."""
    if not isinstance(node, dict):
        return False
    if not set(node) <= _STRICT_KEYWORDS:
        return False
    if node.get("type") == "object" or "properties" in node:
        properties = node.get("properties") or {}
        if (
            depth >= _STRICT_MAX_OBJECT_DEPTH
            or node.get("additionalProperties") is not False
            or set(node.get("required") or []) != set(properties)
        ):
            return False
        if not all(_is_strict(sub, depth + 1) for sub in properties.values()):
            return False
    items = node.get("items")
    if items is not None and not _is_strict(items, depth):
        return False
    return all(_is_strict(branch, depth) for branch in node.get("anyOf") or [])


@functools.cache
def _portable(schema: type[BaseModel]) -> tuple[str, bool]:
    raw = schema.model_json_schema()
    defs = {**raw.get("definitions", {}), **raw.get("$defs", {})}
    portable = _inline(raw, defs, (), schema.__name__)
    strict = portable.get("type") == "object" and _is_strict(portable)
    return json.dumps(portable), strict


def portable_schema(schema: type[BaseModel]) -> tuple[dict[str, Any], bool]:
    """A pydantic model's JSON Schema in the form every provider's structured output takes,
    and whether it also keeps to OpenAI's strict-mode rules.

    ``$ref``s are inlined (Gemini's older responseSchema and Anthropic's output_format have
    no ``$defs``; vLLM's grammar backends differ in support), ``oneOf`` becomes ``anyOf``,
    ``const`` a one-value ``enum``, and titles, defaults and examples are left out. The
    provider's own translation (litellm's, for Anthropic and Gemini) drops what its model
    cannot enforce; vkr validates every reply against the full pydantic model either way.
    A fresh copy each time: providers may rewrite what they are given.
    """
    text, strict = _portable(schema)
    return json.loads(text), strict


_FORMAT_NAME = re.compile(r"[^a-zA-Z0-9_-]")


def response_format(step: Step[Any, Any]) -> dict[str, Any] | None:
    """The step's output schema as OpenAI's ``response_format`` (json_schema), or None when
    the step opts out or has no schema. litellm translates this form for Anthropic and
    Gemini; OpenAI-compatible servers (vLLM) take it as is."""
    schema = getattr(step, "output_schema", None)
    if schema is None or not step.structured_output:
        return None
    body, strict = portable_schema(schema)
    name = _FORMAT_NAME.sub("_", step.name)[:64] or "reply"
    return {
        "type": "json_schema",
        "json_schema": {"name": name, "schema": body, "strict": strict},
    }


@dataclass(frozen=True)
class StepReply(Generic[Out]):
    """One parsed reply: the output, the raw text (kept in verdicts) and the model's name."""

    output: Out
    raw: str
    model: str


class Step(Generic[In, Out]):
    """A model-backed step: ``format_input`` builds the messages for one ``In``,
    ``format_output`` parses a reply into ``output_schema`` (an ``Out``).

    The engine makes the call (``ctx.run(step, inp, *key)``): it picks the model, caches,
    retries and records. A step that needs several calls (a fixed set of models, samples)
    makes each through ``ctx.call`` / ``ctx.run``.
    """

    name: ClassVar[str]
    # A gate that only looks at the candidate (no model) sets this False: it needs no pool
    # entry, no eligibility and makes no calls.
    uses_model: ClassVar[bool] = True
    modality: ClassVar[Literal["text", "vision"]] = "vision"
    prompt_version: ClassVar[str] = "v1"
    # The step's prompt file, if it has one: its version (declared + text hash) replaces
    # ``prompt_version``.
    prompt: ClassVar[Prompt | None] = None
    output_schema: type[Out]
    # random: one eligible model per instance; all: every model of a fixed set;
    # exclude_generator: random among eligible models other than the example's generator.
    selection: ClassVar[Literal["random", "all", "exclude_generator"]] = "random"
    temperature: ClassVar[float] = 0.0
    max_tokens: ClassVar[int | None] = 2048
    # Whether a model whose pool entry has ``structured_output: true`` is sent this step's
    # JSON schema. A step whose reply is not one JSON object of ``output_schema`` opts out.
    structured_output: ClassVar[bool] = True

    def version(self) -> str:
        """What goes into cache keys and the eligibility registry: the prompt version and a
        hash of the output schema, so changing either replays nothing and re-qualifies."""
        declared = self.prompt.version if self.prompt is not None else self.prompt_version
        schema = getattr(self, "output_schema", None)
        if schema is None:  # a step without a model has no reply to parse
            return declared
        return f"{declared}-{schema_digest(schema)}"

    def format_input(self, inp: In, ctx: StepContext) -> list[dict[str, Any]]:
        """The chat messages for one input (frames as ``ctx.frame_parts()``)."""
        raise NotImplementedError(f"step {self.name!r} builds no messages (format_input)")

    def format_output(self, text: str) -> Out:
        """A reply parsed into ``output_schema``, or ReplyError('malformed') with the raw text."""
        return parse_reply(self.output_schema, text)

    def strata(self, inp: In) -> dict[str, str]:
        """The ``discipline`` and ``subject`` of an input whose item is not a video.

        Qualification pilots sample each discipline in proportion: a video brings its own,
        a text step's input (a lecture, a knowledge point) knows it only here. Every caller
        gets them this way, whoever calls the step.
        """
        return {}

    def parse(self, text: str) -> Out:
        """``format_output`` under its older name, which qualification pilots call."""
        return self.format_output(text)


class Generator(Step[In, Out]):
    """The step that writes candidate examples, one per (skill, round) of a video."""

    async def generate(self, ctx: StepContext, skill: SkillSpec, round: int) -> Candidate:
        raise NotImplementedError


class Gate(Step[Candidate, Out]):
    """A verifier: returns a Verdict; a candidate goes on only while verdicts pass.

    A gate of one model call implements ``format_input``/``format_output`` and ``verdict``;
    one that needs more calls, or none, overrides ``check``.
    """

    order: ClassVar[int] = 100

    async def check(self, ctx: StepContext, candidate: Candidate) -> Verdict:
        reply = await ctx.call(
            self,
            candidate,
            candidate.example_id,
            exclude=self.excluded_models(candidate),
            meta={"skill": candidate.skill},
        )
        return self.verdict(candidate, reply)

    def excluded_models(self, candidate: Candidate) -> tuple[str, ...]:
        """Models that must not judge this candidate (an independent checker's generator)."""
        return ()

    def verdict(self, candidate: Candidate, reply: StepReply[Out]) -> Verdict:
        """The decision on a candidate from the model's parsed reply."""
        raise NotImplementedError(f"gate {self.name!r} makes no verdict (verdict or check)")
