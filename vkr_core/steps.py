"""Base classes for steps and gates, and the reply parsing they share.

A step builds messages (``format_input``) and parses a reply into its pydantic schema
(``format_output``); a reply that does not parse becomes a recorded rejection with the
raw text kept, never a crash.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import BaseModel, ValidationError

from vkr_core.schemas import Candidate, Verdict, VkrError

if TYPE_CHECKING:
    from vkr_core.context import StepContext


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


class Step:
    """A model-backed pipeline step.

    Subclasses set the class attributes and implement their own ``run``-like method
    (``generate`` for the generator, ``check`` for gates).
    """

    name: ClassVar[str]
    # A gate that only looks at the candidate (no model) sets this False: it needs no pool
    # entry, no eligibility and makes no calls.
    uses_model: ClassVar[bool] = True
    modality: ClassVar[Literal["text", "vision"]] = "vision"
    prompt_version: ClassVar[str] = "v1"
    output_schema: ClassVar[type[BaseModel]]
    # random: one eligible model per instance; all: every model of a fixed set;
    # exclude_generator: random among eligible models other than the example's generator.
    selection: ClassVar[Literal["random", "all", "exclude_generator"]] = "random"
    temperature: ClassVar[float] = 0.0
    max_tokens: ClassVar[int | None] = 2048

    def version(self) -> str:
        """The prompt version that goes into cache keys and the eligibility registry."""
        return self.prompt_version

    def parse(self, text: str) -> BaseModel:
        """Parse a reply into ``output_schema`` or raise ReplyError('malformed')."""
        try:
            data = extract_json(text)
            return self.output_schema.model_validate(data)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(x) for x in first["loc"]) or "reply"
            raise ReplyError("malformed", f"{where}: {first['msg']}", text) from None
        except ValueError as exc:
            raise ReplyError("malformed", str(exc), text) from None


class Generator(Step):
    """The step that writes candidate examples (example_generation)."""

    async def generate(self, ctx: StepContext, skill: str, round: int) -> Candidate:
        raise NotImplementedError


class Gate(Step):
    """A verifier: returns a Verdict; a candidate goes on only while verdicts pass."""

    order: ClassVar[int] = 100

    async def check(self, ctx: StepContext, candidate: Candidate) -> Verdict:
        raise NotImplementedError
