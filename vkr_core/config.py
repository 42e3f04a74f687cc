"""Pool, eligibility registry and run configuration: YAML files validated by pydantic."""

from __future__ import annotations

import datetime
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from vkr_core.errors import describe_validation_error
from vkr_core.files import atomic_write
from vkr_core.schemas import InputError


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


Modality = Literal["text", "vision"]


def _text_and_vision() -> list[Modality]:
    return ["text", "vision"]


class ModelSpec(Strict):
    """One model in the pool. The API key is named by an environment variable, never stored."""

    name: str = Field(description="vkr's name for the model: used in the registry and records")
    model: str = Field(description="litellm model name, e.g. openai/gpt-4o or anthropic/claude-...")
    provider: str = "litellm"
    api_base: str | None = None
    api_key_env: str | None = None
    modality: list[Modality] = Field(default_factory=_text_and_vision)
    max_concurrency: int = Field(default=8, ge=1)
    rpm: int | None = Field(default=None, ge=1)
    tpm: int | None = Field(default=None, ge=1)
    timeout: float = Field(default=120.0, gt=0)
    input_cost_per_token: float | None = Field(default=None, ge=0)
    output_cost_per_token: float | None = Field(default=None, ge=0)
    structured_output: bool = Field(
        default=False,
        description="send each step's JSON schema with the call, in the provider's native form",
    )
    options: dict[str, Any] = Field(
        default_factory=dict,
        description="provider-specific settings, validated by the provider named in 'provider' "
        "(e.g. how provider: vllm starts its server)",
    )

    def api_key(self) -> str | None:
        if not self.api_key_env:
            return None
        return os.environ.get(self.api_key_env)

    def sees_images(self) -> bool:
        return "vision" in self.modality


class StepPoolConfig(Strict):
    """Per-step options in the pool file."""

    models: list[str] | None = Field(
        default=None,
        description="fixed model set (a step with selection: all) or a restriction of the pool",
    )
    temperature: float | None = None
    max_tokens: int | None = None


class Pool(Strict):
    models: list[ModelSpec]
    steps: dict[str, StepPoolConfig] = Field(default_factory=dict)
    registry: str | None = Field(default=None, description="eligibility registry file")
    source_path: str | None = Field(default=None, exclude=True)

    @field_validator("models")
    @classmethod
    def _unique(cls, models: list[ModelSpec]) -> list[ModelSpec]:
        seen: set[str] = set()
        for spec in models:
            if spec.name in seen:
                raise ValueError(f"model {spec.name!r} appears twice in the pool")
            seen.add(spec.name)
        if not models:
            raise ValueError("the pool has no models")
        return models

    def get(self, name: str) -> ModelSpec:
        for spec in self.models:
            if spec.name == name:
                return spec
        raise InputError(f"model {name!r} is not in the pool ({', '.join(self.names())})")

    def names(self) -> list[str]:
        return [m.name for m in self.models]

    def registry_path(self) -> Path | None:
        if not self.registry:
            return None
        path = Path(self.registry)
        if not path.is_absolute() and self.source_path:
            path = Path(self.source_path).parent / path
        return path


class Eligibility(Strict):
    """One (step, model) entry of the eligibility registry.

    Beside the verdict, ``vkr qualify score`` writes the provenance that lets anyone check it.
    Any other key is refused: a misspelt ``error_rate`` must not pass unnoticed.
    """

    eligible: bool
    error_rate: float | None = Field(default=None, ge=0, le=1)
    n: int | None = Field(default=None, ge=0)
    prompt_version: str | None = None
    pilot_id: str | None = None
    inputs_sha256: str | None = None
    annotators: list[str] | None = None
    annotator_policy: str | None = None
    date: str | None = None
    hard: int | None = Field(default=None, ge=0)
    soft: int | None = Field(default=None, ge=0)
    wilson_low: float | None = Field(default=None, ge=0, le=1)
    wilson_high: float | None = Field(default=None, ge=0, le=1)
    rule: str | None = None
    kappa: list[dict[str, Any]] | None = None
    # The pilot's calls carried the step's JSON schema (the pool entry's structured_output).
    structured_output: bool | None = None

    @field_validator("date", mode="before")
    @classmethod
    def _date_as_text(cls, value: Any) -> Any:
        # YAML reads an unquoted 2026-01-31 as a date.
        return value.isoformat() if isinstance(value, datetime.date) else value


class EligibilityRegistry(BaseModel):
    """step -> model -> eligibility, as written by ``vkr qualify score``."""

    model_config = ConfigDict(extra="forbid")

    steps: dict[str, dict[str, Eligibility]] = Field(default_factory=dict)

    def entry(self, step: str, model: str) -> Eligibility | None:
        return self.steps.get(step, {}).get(model)


class RunConfig(Strict):
    """Everything about a run that changes its results (snapshotted in the run directory)."""

    # The registered pipeline the run drives (``vkr run --pipeline``).
    pipeline: str = "generation"
    # Backends of the run's seams (vkr_core.backends): where checkpoints and the call cache
    # live and what runs the items. A run directory keeps the ones it started with.
    checkpointer: str = "sqlite"
    call_cache: str = "diskcache"
    executor: str = "local"
    state: str | None = Field(
        default=None,
        description="URL of state shared by several drivers (postgresql://user@host/db): "
        "checkpoints, call cache and item status live there, not in the run directory; kept "
        "without its password",
    )
    seed: int = 0
    fps: float = Field(default=0.2, gt=0)
    max_frames: int = Field(default=64, ge=1)
    max_side: int = Field(default=768, ge=64)
    jpeg_quality: int = Field(default=85, ge=30, le=100)
    rounds_per_skill: int | None = Field(
        default=None, ge=1, description="overrides each skill's own"
    )
    skills: list[str] | None = Field(default=None, min_length=1)
    seed_bank: str | None = None
    seeds_per_round: int = Field(default=3, ge=1)
    dependency_frames: int = Field(default=4, ge=1)
    allow_stale: bool = False
    decode_timeout: float = Field(default=120.0, gt=0)
    # The folder records' video paths are relative to (absolute). Snapshotted so one run never
    # mixes two roots and `vkr export` can default to it (or name it when files are missing).
    video_root: str | None = None
    # Not part of what a run produces, so left out of the config snapshot.
    retry_failed: bool = Field(default=False, exclude=True)
    executor_options: dict[str, Any] = Field(
        default_factory=dict,
        exclude=True,
        description="settings of the executor backend that change no result (Ray's address "
        "and number of workers)",
    )
    skip_preflight: bool = Field(
        default=False, exclude=True, description="skip the reach check (keys are still checked)"
    )
    preflight_timeout: float = Field(default=15.0, gt=0, exclude=True)
    cooldown: float = Field(
        default=10.0, gt=0, exclude=True, description="first cool-down of a failing model (s)"
    )
    max_spend: float | None = Field(
        default=None, ge=0, exclude=True, description="USD the run directory may spend in all"
    )

    @field_validator("state")
    @classmethod
    def _state_without_password(cls, url: str | None) -> str | None:
        # The snapshot, records and logs see the URL only; its password stays in this process.
        from vkr_core.backends import remember_password, split_password
        from vkr_core.log import register_secrets

        if url is None:
            return None
        public, password = split_password(url)
        if password is not None:
            register_secrets([password, url])
            remember_password(public, password)
        return public


# libyaml's safe loader where PyYAML was built with it: the same data, 10x faster (the pool
# and registry are read at every command's start).
_SAFE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def read_yaml(path: str | Path, what: str) -> Any:
    """A YAML file's data ({} when empty); an unreadable file is a one-line InputError
    naming ``what``, the path and, for a syntax error, the line and column."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{what} file not found: {p}")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise InputError(f"{what} file {p} is not UTF-8 text") from None
    try:
        return yaml.load(text, Loader=_SAFE_LOADER) or {}
    except yaml.YAMLError:
        pass  # reported from PyYAML's own loader below, whose words are the clearer
    try:
        return yaml.safe_load(text) or {}
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = exc.problem or exc.context or "syntax error"
        raise InputError(f"{what} file {p} is not valid YAML{where}: {problem}") from None
    except yaml.YAMLError as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InputError(f"{what} file {p} is not valid YAML: {first}") from None


def load_pool(path: str | Path) -> Pool:
    data = read_yaml(path, "pool")
    try:
        pool = Pool.model_validate(data)
    except ValidationError as exc:
        raise InputError(f"pool file {path} is invalid: {describe_validation_error(exc)}") from None
    pool.source_path = str(path)
    return pool


def load_registry(path: str | Path) -> EligibilityRegistry:
    data = read_yaml(path, "eligibility registry")
    try:
        return EligibilityRegistry.model_validate({"steps": data})
    except ValidationError as exc:
        # Validated under "steps", which the file does not have: report paths as written.
        raise InputError(
            f"eligibility registry {path} is invalid: {describe_validation_error(exc, strip=1)}"
        ) from None


def save_registry(registry: EligibilityRegistry, path: str | Path) -> None:
    data = {
        step: {m: e.model_dump(exclude_none=True) for m, e in models.items()}
        for step, models in registry.steps.items()
    }
    # The registry decides which models a run may use: never leave half of one.
    atomic_write(path, yaml.safe_dump(data, sort_keys=True))


def fingerprint(data: Any) -> str:
    """A stable hash of JSON-able data (config snapshots, cache signatures)."""
    blob = json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()
