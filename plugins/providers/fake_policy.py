"""Behaviour policy of the fake model server: what share of replies are right, broken or faulty.

A policy has four layers, later ones winning: ``defaults`` < ``steps[step]`` <
``models[model]`` < ``model_steps["model|step"]``. Knob names may also sit at the top
level of a policy document, as a shorthand for ``defaults``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from vkr_core.errors import describe_validation_error
from vkr_core.schemas import InputError

# "503" is the protocol's overload reply (Anthropic words it 529); "blocked" refuses the prompt
# as a whole (Gemini's promptFeedback.blockReason; a plain refusal on the other protocols).
Outcome = Literal["ok", "429", "500", "503", "malformed", "refusal", "blocked", "hang"]
OUTCOMES: tuple[str, ...] = (
    "ok",
    "429",
    "500",
    "503",
    "malformed",
    "refusal",
    "blocked",
    "hang",
)


class Knobs(BaseModel):
    """The resolved behaviour for one (model, step)."""

    model_config = ConfigDict(extra="forbid")

    accuracy: float = Field(default=0.8, ge=0, le=1, description="share of right answers at gates")
    cot_pass: float = Field(default=0.8, ge=0, le=1, description="share of cot_verification passes")
    mistake: float = Field(
        default=0.0,
        ge=0,
        le=1,
        description="share of generated examples whose answer is the question's common mistake; "
        "where set at a gate, its wrong answers are that same mistake (a shared misconception)",
    )
    relevant: float = Field(
        default=0.8, ge=0, le=1, description="share of items the relevance judges pass"
    )
    malformed: float = Field(default=0.0, ge=0, le=1, description="share of broken replies")
    refusal: float = Field(default=0.0, ge=0, le=1, description="share of content_filter refusals")
    blocked: float = Field(
        default=0.0,
        ge=0,
        le=1,
        description="share of prompts refused as a whole (Gemini promptFeedback.blockReason; "
        "a refusal on the other protocols)",
    )
    latency_ms: float = Field(default=0.0, ge=0, description="added to every request")
    latency_tail_ms: float = Field(
        default=0.0,
        ge=0,
        description="mean of an exponentially distributed delay added on top of latency_ms "
        "(a real provider's long tail; seeded, so a run's delays repeat)",
    )
    rate_limit: float = Field(default=0.0, ge=0, le=1, description="share of HTTP 429")
    retry_after_s: float = Field(default=1.0, ge=0, description="Retry-After of a 429")
    server_error: float = Field(default=0.0, ge=0, le=1, description="share of HTTP 500/503")
    hang: float = Field(default=0.0, ge=0, le=1, description="share of requests that hang")
    hang_s: float = Field(default=3600.0, ge=0, description="how long a hung request sleeps")
    needs_schema: bool = Field(
        default=False,
        description=(
            "a request without a response schema gets a malformed reply; one with a schema "
            "is well-formed whatever the malformed share (scripted outcomes still apply)"
        ),
    )
    violate_schema: float = Field(
        default=0.0,
        ge=0,
        le=1,
        description="share of requests with a response schema answered with valid JSON "
        "that breaks the schema",
    )
    script: list[Outcome] = Field(
        default_factory=list, description="outcomes consumed in order before the shares apply"
    )


class KnobOverrides(BaseModel):
    """Some knobs of one layer; unset knobs fall through to the layer below."""

    model_config = ConfigDict(extra="forbid")

    accuracy: float | None = Field(default=None, ge=0, le=1)
    cot_pass: float | None = Field(default=None, ge=0, le=1)
    mistake: float | None = Field(default=None, ge=0, le=1)
    relevant: float | None = Field(default=None, ge=0, le=1)
    malformed: float | None = Field(default=None, ge=0, le=1)
    refusal: float | None = Field(default=None, ge=0, le=1)
    blocked: float | None = Field(default=None, ge=0, le=1)
    latency_ms: float | None = Field(default=None, ge=0)
    latency_tail_ms: float | None = Field(default=None, ge=0)
    rate_limit: float | None = Field(default=None, ge=0, le=1)
    retry_after_s: float | None = Field(default=None, ge=0)
    server_error: float | None = Field(default=None, ge=0, le=1)
    hang: float | None = Field(default=None, ge=0, le=1)
    hang_s: float | None = Field(default=None, ge=0)
    needs_schema: bool | None = None
    violate_schema: float | None = Field(default=None, ge=0, le=1)
    script: list[Outcome] | None = None


KNOB_NAMES: frozenset[str] = frozenset(Knobs.model_fields)


class ServerPolicy(BaseModel):
    """A whole policy document."""

    model_config = ConfigDict(extra="forbid")

    defaults: KnobOverrides = Field(default_factory=KnobOverrides)
    steps: dict[str, KnobOverrides] = Field(default_factory=dict)
    models: dict[str, KnobOverrides] = Field(default_factory=dict)
    model_steps: dict[str, KnobOverrides] = Field(
        default_factory=dict, description='keyed "model|step", like /stats by_model_step'
    )

    def layers(self, model: str, step: str) -> list[tuple[str, KnobOverrides]]:
        """The layers that apply to (model, step), lowest first, each with a scope name."""
        found = [("defaults", self.defaults)]
        if step in self.steps:
            found.append((f"steps:{step}", self.steps[step]))
        if model in self.models:
            found.append((f"models:{model}", self.models[model]))
        key = f"{model}|{step}"
        if key in self.model_steps:
            found.append((f"model_steps:{key}", self.model_steps[key]))
        return found

    def resolve(self, model: str, step: str) -> tuple[Knobs, str]:
        """The knobs for (model, step) and the scope that supplied the script.

        The scope lets the server keep one script cursor per model and scope, so a
        default script is consumed independently by every model.
        """
        merged: dict[str, Any] = {}
        script_scope = "defaults"
        for scope, layer in self.layers(model, step):
            values = layer.model_dump(exclude_none=True)
            if "script" in values:
                script_scope = scope
            merged.update(values)
        return Knobs.model_validate(merged), script_scope


def parse_policy(data: Any, where: str = "policy") -> ServerPolicy:
    """Validate a policy document (a dict) or raise InputError naming the bad field."""
    if data is None:
        return ServerPolicy()
    if isinstance(data, ServerPolicy):
        return data
    if not isinstance(data, dict):
        raise InputError(f"{where} must be a mapping, not {type(data).__name__}")
    document = dict(data)
    top_level_knobs = {k: document.pop(k) for k in list(document) if k in KNOB_NAMES}
    if top_level_knobs:
        defaults = dict(document.get("defaults") or {})
        clash = sorted(set(defaults) & set(top_level_knobs))
        if clash:
            raise InputError(f"{where}: {', '.join(clash)} given both at top level and in defaults")
        defaults.update(top_level_knobs)
        document["defaults"] = defaults
    for key in document.get("model_steps") or {}:
        if not isinstance(key, str) or key.count("|") != 1:
            raise InputError(f'{where}: model_steps key {key!r} must look like "model|step"')
    try:
        return ServerPolicy.model_validate(document)
    except ValidationError as exc:
        raise InputError(f"{where} is invalid: {describe_validation_error(exc)}") from None


def load_policy(path: str | Path) -> ServerPolicy:
    """Read a policy from a YAML or JSON file (JSON is YAML, so one parser reads both)."""
    from vkr_core.config import read_yaml

    p = Path(path)
    return parse_policy(read_yaml(p, "policy"), where=f"policy file {p}")


def dump_policy(policy: ServerPolicy) -> str:
    """The policy as JSON, leaving out unset knobs."""
    return json.dumps(policy.model_dump(exclude_none=True), indent=2, sort_keys=True)
