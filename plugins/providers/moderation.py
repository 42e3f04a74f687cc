"""Image moderation as a provider kind (DESIGN.md stage 8): is a video safe to keep?

A :class:`Moderator` scores one image per category. Two ship here, registered through
``vkr_register_providers`` like any provider (a pool never routes a chat call to them):

- ``azure-content-safety``: Azure AI Content Safety ``image:analyze`` (the paper's), a
  severity of 0, 2, 4 or 6 per category (Hate, SelfHarm, Sexual, Violence).
- ``openai-moderation``: OpenAI ``omni-moderation-latest`` through litellm, a score in
  [0, 1] per category.

:class:`ImageModeration` does the rest for either: a few seeded random frames per video,
retries (429 with Retry-After, 5xx, timeouts), a cache of each image's scores so a rerun
sends nothing, a CallRecord per image, and a :class:`ModerationRecord` per video with every
image's scores and the decision against the thresholds in :class:`ModerationSettings`.

Keys come from environment variables, are registered as secrets, and never reach a record,
a log line or an error.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import random
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar

from pydantic import Field, ValidationError, field_validator

from vkr_core.calls import PermanentError, Provider, ProviderReply, TransientError
from vkr_core.config import ModelSpec
from vkr_core.errors import describe_validation_error
from vkr_core.files import atomic_write
from vkr_core.hookspecs import hookimpl
from vkr_core.log import redact, register_secrets
from vkr_core.moderation import find_image_moderator
from vkr_core.router import seeded_rng
from vkr_core.schemas import CallRecord, Frame, InputError, Strict, VkrError, check_video_id

MODERATION_STEP = "moderation"
# Where a run keeps one ModerationRecord per video: RUN_DIR/moderation/<video_id>.json.
RECORDS_DIR = "moderation"
# Frames moderated per video, as in the paper.
FRAMES_PER_VIDEO = 4
# Azure AI Content Safety takes images up to 4 MB (its documented input limit).
MAX_IMAGE_BYTES = 4 * 1024 * 1024


class ModerationError(VkrError):
    """Moderation could not be done: a refused key, an endpoint that does not answer."""


# ---------------------------------------------------------------- settings and records


class ModerationSettings(Strict):
    """How a run moderates: which moderator, where, with which key, and the thresholds.

    ``thresholds`` override the moderator's defaults per category: an image is flagged when
    any category's score is at or over its threshold (an Azure severity 0-7, an OpenAI
    score 0-1). A category left out keeps its default.
    """

    provider: str = "azure-content-safety"
    frames_per_video: int = Field(default=FRAMES_PER_VIDEO, ge=1, le=32)
    # None: the moderator's environment variable (AZURE_CONTENT_SAFETY_ENDPOINT), or its
    # public endpoint (OpenAI).
    endpoint: str | None = None
    # The environment variable holding the key; None: the moderator's default name.
    api_key_env: str | None = None
    model: str | None = None
    thresholds: dict[str, float] = Field(default_factory=dict)
    timeout: float = Field(default=30.0, gt=0)
    attempts: int = Field(default=5, ge=1, le=20)
    # Requests in flight at once: Azure's S0 tier allows about 10 a second per resource.
    max_concurrency: int = Field(default=8, ge=1, le=256)

    @field_validator("thresholds")
    @classmethod
    def _non_negative(cls, value: dict[str, float]) -> dict[str, float]:
        for category, threshold in value.items():
            if threshold < 0:
                raise ValueError(f"threshold of {category!r} is {threshold}: it must be >= 0")
        return value


def parse_settings(data: Any, where: str = "moderation settings") -> ModerationSettings:
    """Settings from a mapping (a config file's ``moderation:`` section), or InputError."""
    try:
        return ModerationSettings.model_validate(data or {})
    except ValidationError as exc:
        raise InputError(f"{where} are invalid: {describe_validation_error(exc)}") from None


class ImageScores(Strict):
    """One image's moderation: its scores, and the categories at or over their threshold."""

    sha256: str
    path: str
    timestamp: float | None = None
    scores: dict[str, float]
    flagged: list[str] = Field(default_factory=list)
    cache_hit: bool = False


class ModerationRecord(Strict):
    """A video's moderation, as a run records it: every image's scores and the decision."""

    item_id: str
    provider: str
    model: str
    thresholds: dict[str, float]
    # A hash of the thresholds: records decided under other thresholds are told apart.
    thresholds_version: str
    images: list[ImageScores]
    safe: bool
    reason: str


def thresholds_version(thresholds: dict[str, float]) -> str:
    blob = json.dumps(thresholds, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def record_path(run_dir: str | Path, item_id: str) -> Path:
    return Path(run_dir) / RECORDS_DIR / f"{check_video_id(item_id)}.json"


def write_record(run_dir: str | Path, record: ModerationRecord) -> Path:
    """Keep a video's moderation record in the run directory (replaced atomically)."""
    path = record_path(run_dir, record.item_id)
    atomic_write(path, redact(record.model_dump_json(indent=2)))
    return path


# ---------------------------------------------------------------- images


class ImageInput(Strict):
    """An image to moderate: a file, with its content hash and, for a frame, its time."""

    path: str
    sha256: str
    timestamp: float | None = None

    @classmethod
    def from_frame(cls, frame: Frame) -> ImageInput:
        return cls(path=frame.path, sha256=frame.sha256, timestamp=frame.timestamp)

    @classmethod
    def from_file(cls, path: str | Path) -> ImageInput:
        data = _read_image(Path(path))
        return cls(path=str(path), sha256=hashlib.sha256(data).hexdigest())


def _read_image(path: Path) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InputError(f"cannot read image {path}: {exc.strerror or exc}") from None
    if not data:
        raise InputError(f"image {path} is empty")
    if len(data) > MAX_IMAGE_BYTES:
        raise InputError(
            f"image {path} is {len(data):,} bytes, over the {MAX_IMAGE_BYTES:,}-byte limit of "
            "image moderation"
        )
    return data


def pick_frames(frames: Sequence[Frame], k: int, seed: int, item_id: str) -> list[Frame]:
    """``k`` random frames of a video, in time order: the same ones on every rerun."""
    if k >= len(frames):
        return list(frames)
    chosen = seeded_rng(seed, item_id, MODERATION_STEP).sample(range(len(frames)), k)
    return [frames[i] for i in sorted(chosen)]


# ---------------------------------------------------------------- the provider kind


def _error_detail(raw: bytes | str) -> str:
    """The ``error.message`` (and code) of an Azure or OpenAI error body, else its text."""
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
    try:
        error = json.loads(text).get("error") or {}
        message, code = error.get("message"), error.get("code")
        if message:
            return f"{message} ({code})" if code else str(message)
    except (ValueError, AttributeError):
        pass
    return " ".join(text.split())


class Moderator(Provider):
    """An image moderation provider: scores per category for one image.

    A provider of its own kind: it answers no chat request, and a run finds it by name in
    the providers plugins register.
    """

    kind: ClassVar[str] = "moderation"
    categories: ClassVar[tuple[str, ...]]
    default_thresholds: ClassVar[dict[str, float]]
    default_model: ClassVar[str]
    key_env: ClassVar[str]
    # What a score is, for messages and the README: "severity 0-7", "score 0-1".
    scale: ClassVar[str]

    def thresholds(self, settings: ModerationSettings) -> dict[str, float]:
        unknown = sorted(set(settings.thresholds) - set(self.categories))
        if unknown:
            raise InputError(
                f"{self.name} has no category {', '.join(map(repr, unknown))}: its categories "
                f"are {', '.join(self.categories)}"
            )
        return {**self.default_thresholds, **settings.thresholds}

    def model(self, settings: ModerationSettings) -> str:
        return settings.model or self.default_model

    def endpoint(self, settings: ModerationSettings) -> str | None:
        return settings.endpoint

    def api_key(self, settings: ModerationSettings) -> str:
        name = settings.api_key_env or self.key_env
        key = os.environ.get(name)
        if not key:
            raise InputError(f"{self.name} needs an API key: set the environment variable {name}")
        register_secrets([key])
        return key

    def check_moderation(self, settings: dict[str, Any]) -> None:
        """Raise InputError now for thresholds, a key or an endpoint that cannot work, so a
        run stops before anything is paid for."""
        parsed = parse_settings(settings)
        self.thresholds(parsed)
        self.api_key(parsed)
        self.endpoint(parsed)

    def image_moderation(
        self,
        settings: dict[str, Any],
        cache: Any,
        on_record: Callable[[CallRecord], None] | None = None,
    ) -> ImageModeration:
        """An open moderation with this moderator (the vkr_core.moderation contract)."""
        return ImageModeration(self, parse_settings(settings), cache, on_record)

    def signature(self, settings: ModerationSettings) -> dict[str, Any]:
        """What changes an image's scores (never the key, never the thresholds)."""
        return {
            "provider": self.name,
            "model": self.model(settings),
            "endpoint": self.endpoint(settings),
        }

    async def analyze(self, image: bytes, settings: ModerationSettings) -> dict[str, float]:
        """One image's score per category; raises TransientError or PermanentError."""
        raise NotImplementedError

    async def complete(
        self,
        spec: ModelSpec,
        messages: list[dict[str, Any]],
        params: dict[str, Any],
        headers: dict[str, str],
    ) -> ProviderReply:
        raise PermanentError(
            f"{self.name} is an image moderation provider: it answers no chat request "
            f"(model {spec.name!r} names it as its provider)"
        )


def _classify_status(status: int, where: str, detail: str, retry_after: float | None) -> None:
    message = f"HTTP {status} from {where}: {redact(detail)[:300]}"
    if status in (408, 409, 429) or status >= 500:
        raise TransientError(message, retry_after, status)
    raise PermanentError(message, status)


def _retry_after(headers: Any) -> float | None:
    for name, scale in (("retry-after-ms", 1000.0), ("Retry-After", 1.0)):
        value = headers.get(name) if headers is not None else None
        if value is None:
            continue
        try:
            return float(value) / scale
        except ValueError:
            continue  # an HTTP date: fall back to backoff
    return None


class AzureContentSafety(Moderator):
    """Azure AI Content Safety ``image:analyze`` (REST, API version 2024-09-01)."""

    name = "azure-content-safety"
    categories = ("Hate", "SelfHarm", "Sexual", "Violence")
    # Image severities are 0 (safe), 2 (low), 4 (medium) or 6 (high). Azure's own default
    # content filter (Azure OpenAI) blocks medium and high and lets low through: the same
    # line here, so a frame of a surgery or a boxing match is not dropped for "low" violence.
    default_thresholds = dict.fromkeys(categories, 4.0)
    api_version = "2024-09-01"
    default_model = f"image:analyze@{api_version}"
    key_env = "AZURE_CONTENT_SAFETY_KEY"
    endpoint_env = "AZURE_CONTENT_SAFETY_ENDPOINT"
    scale = "severity 0-7"

    def __init__(self) -> None:
        self._sessions: dict[int, Any] = {}

    def endpoint(self, settings: ModerationSettings) -> str:
        endpoint = settings.endpoint or os.environ.get(self.endpoint_env)
        if not endpoint:
            raise InputError(
                f"{self.name} needs the Content Safety resource's endpoint: set "
                f"{self.endpoint_env} (https://<resource>.cognitiveservices.azure.com)"
            )
        return endpoint.rstrip("/")

    def _session(self, settings: ModerationSettings) -> Any:
        import aiohttp

        loop = asyncio.get_running_loop()
        session = self._sessions.get(id(loop))
        if session is None or session.closed:
            session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=settings.timeout))
            self._sessions[id(loop)] = session
        return session

    async def aclose(self) -> None:
        sessions, self._sessions = list(self._sessions.values()), {}
        for session in sessions:
            await session.close()

    async def analyze(self, image: bytes, settings: ModerationSettings) -> dict[str, float]:
        import aiohttp

        url = f"{self.endpoint(settings)}/contentsafety/image:analyze"
        body = {
            "image": {"content": base64.b64encode(image).decode("ascii")},
            "categories": list(self.categories),
            "outputType": "FourSeverityLevels",
        }
        headers = {
            "Ocp-Apim-Subscription-Key": self.api_key(settings),
            "Content-Type": "application/json",
        }
        try:
            async with self._session(settings).post(
                url, params={"api-version": self.api_version}, json=body, headers=headers
            ) as response:
                raw = await response.read()
                status = response.status
                retry_after = _retry_after(response.headers)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise TransientError(
                f"{type(exc).__name__} from {url}: {redact(str(exc))[:200]}"
            ) from None
        if status != 200:
            _classify_status(status, url, _error_detail(raw), retry_after)
        try:
            analysis = json.loads(raw)["categoriesAnalysis"]
            return {str(a["category"]): float(a.get("severity") or 0) for a in analysis}
        except (ValueError, KeyError, TypeError) as exc:
            raise PermanentError(
                f"unreadable reply from {url}: {type(exc).__name__}: {redact(str(exc))[:200]}"
            ) from None


# The categories of omni-moderation, as the API names them; the SDK's models name them
# with underscores (self_harm_intent), which litellm may hand back.
OPENAI_CATEGORIES = (
    "harassment",
    "harassment/threatening",
    "hate",
    "hate/threatening",
    "illicit",
    "illicit/violent",
    "self-harm",
    "self-harm/instructions",
    "self-harm/intent",
    "sexual",
    "sexual/minors",
    "violence",
    "violence/graphic",
)
_OPENAI_PYTHON_NAMES = {c.replace("-", "_").replace("/", "_"): c for c in OPENAI_CATEGORIES}


def _openai_category(name: str) -> str:
    return _OPENAI_PYTHON_NAMES.get(name, name)


class OpenAIModeration(Moderator):
    """OpenAI ``omni-moderation-latest`` through litellm (``litellm.amoderation``)."""

    name = "openai-moderation"
    categories = OPENAI_CATEGORIES
    # Scores are the model's probability that the image is in the category: flag what is
    # more likely than not in it. OpenAI's own ``flagged`` uses calibrations it does not
    # publish, so it is kept out of the decision: a threshold a user can read and set.
    default_thresholds = dict.fromkeys(categories, 0.5)
    default_model = "omni-moderation-latest"
    key_env = "OPENAI_API_KEY"
    scale = "score 0-1"

    def endpoint(self, settings: ModerationSettings) -> str:
        return (settings.endpoint or "https://api.openai.com/v1").rstrip("/")

    async def analyze(self, image: bytes, settings: ModerationSettings) -> dict[str, float]:
        from openai import AsyncOpenAI

        from plugins.providers.litellm_provider import _litellm_module

        litellm = await _litellm_module()
        url = "data:image/jpeg;base64," + base64.b64encode(image).decode("ascii")
        if image[:8] == b"\x89PNG\r\n\x1a\n":
            url = "data:image/png;base64," + url.split(",", 1)[1]
        endpoint = self.endpoint(settings)
        # Our own client: retries are ImageModeration's (the SDK's would hide 429s), and
        # the key goes to this endpoint only.
        client = AsyncOpenAI(
            api_key=self.api_key(settings),
            base_url=endpoint,
            max_retries=0,
            timeout=settings.timeout,
        )
        try:
            response = await litellm.amoderation(
                input=[{"type": "image_url", "image_url": {"url": url}}],
                model=self.model(settings),
                client=client,
            )
        except Exception as exc:
            status = getattr(exc, "status_code", None) or getattr(
                getattr(exc, "response", None), "status_code", None
            )
            detail = f"{type(exc).__name__}: {_error_detail(str(getattr(exc, 'message', exc)))}"
            if isinstance(status, int):
                response_headers = getattr(getattr(exc, "response", None), "headers", None)
                _classify_status(status, endpoint, detail, _retry_after(response_headers))
            if "Timeout" in type(exc).__name__ or "Connection" in type(exc).__name__:
                raise TransientError(f"{redact(detail)[:300]} ({endpoint})") from None
            raise PermanentError(f"{redact(detail)[:300]} ({endpoint})") from None
        finally:
            await client.close()
        data = response.model_dump() if hasattr(response, "model_dump") else dict(response)
        try:
            scores = data["results"][0]["category_scores"]
            return {_openai_category(str(k)): float(v or 0.0) for k, v in scores.items()}
        except (KeyError, IndexError, TypeError, ValueError) as exc:
            raise PermanentError(
                f"unreadable moderation reply from {endpoint}: {type(exc).__name__}: {exc}"
            ) from None


# ---------------------------------------------------------------- moderating videos


def find_moderator(registry: Any, name: str) -> Moderator:
    """The moderator named ``name`` among the loaded providers (``azure`` and ``openai`` are
    short for the built-in ones), as the engine finds it, typed as this module's kind."""
    found = find_image_moderator(registry, name)
    if not isinstance(found, Moderator):
        raise InputError(f"provider {name!r} moderates images but not through vkr's Moderator")
    return found


class ImageModeration:
    """Moderates images and videos with one moderator: cached, retried and recorded.

    The cache key of an image is the moderator's signature (provider, model, endpoint) and
    the image's sha256: the scores do not depend on the thresholds, so changing thresholds
    re-decides every video from the cache without a request. ``on_record`` gets a
    CallRecord per image (cache hits included), as the run's call log does.
    """

    def __init__(
        self,
        moderator: Moderator,
        settings: ModerationSettings,
        cache: Any,
        on_record: Callable[[CallRecord], None] | None = None,
        backoff: float = 0.5,
    ):
        self.moderator = moderator
        self.settings = settings
        self.cache = cache
        self.on_record = on_record
        self.backoff = backoff
        self.thresholds = moderator.thresholds(settings)
        self.model = moderator.model(settings)
        self._slots = asyncio.Semaphore(settings.max_concurrency)

    @classmethod
    def from_settings(
        cls,
        registry: Any,
        settings: ModerationSettings,
        cache: Any,
        on_record: Callable[[CallRecord], None] | None = None,
    ) -> ImageModeration:
        """The moderation ``settings.provider`` names, among the loaded providers."""
        return cls(find_moderator(registry, settings.provider), settings, cache, on_record)

    async def aclose(self) -> None:
        await self.moderator.aclose()

    def write_record(self, run_dir: str | Path, verdict: Any) -> Path:
        return write_record(run_dir, verdict)

    async def __aenter__(self) -> ImageModeration:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def cache_key(self, sha256: str) -> str:
        signature = {**self.moderator.signature(self.settings), "image": sha256}
        blob = json.dumps(signature, sort_keys=True, separators=(",", ":"))
        return "moderation:" + hashlib.sha256(blob.encode()).hexdigest()

    def flagged(self, scores: dict[str, float]) -> list[str]:
        return sorted(c for c, t in self.thresholds.items() if c in scores and scores[c] >= t)

    async def _analyze_with_retries(self, image: bytes) -> tuple[dict[str, float], int]:
        attempts = 0
        while True:
            attempts += 1
            try:
                return await self.moderator.analyze(image, self.settings), attempts
            except TransientError as exc:
                if attempts >= self.settings.attempts:
                    raise ModerationError(
                        f"{self.moderator.name} gave no answer after {attempts} attempt(s): "
                        f"{redact(str(exc))}"
                    ) from None
                if exc.retry_after is not None:
                    # The service said when; a little spread keeps a burst from returning
                    # in the same millisecond.
                    wait = exc.retry_after * random.uniform(1.0, 1.2)
                else:
                    wait = random.uniform(0, self.backoff * 2 ** (attempts - 1))
                await asyncio.sleep(wait)
            except PermanentError as exc:
                raise ModerationError(f"{self.moderator.name}: {redact(str(exc))}") from None

    async def score(self, image: ImageInput, item_id: str | None = None) -> ImageScores:
        """One image's scores, from the cache or from the moderator."""
        key = self.cache_key(image.sha256)
        started = time.perf_counter()
        hit = self.cache.get(key)
        attempts = 0
        if hit is not None:
            scores = dict(hit["scores"])
        else:
            data = await asyncio.to_thread(_read_image, Path(image.path))
            if hashlib.sha256(data).hexdigest() != image.sha256:
                raise InputError(f"image {image.path} changed since it was hashed")
            try:
                async with self._slots:
                    scores, attempts = await self._analyze_with_retries(data)
            except ModerationError as exc:
                self._emit(key, item_id, started, False, 0, "error", str(exc))
                raise
            self.cache.set(key, {"scores": scores, "provider": self.moderator.name})
        self._emit(key, item_id, started, hit is not None, attempts, "ok", None)
        return ImageScores(
            sha256=image.sha256,
            path=image.path,
            timestamp=image.timestamp,
            scores=scores,
            flagged=self.flagged(scores),
            cache_hit=hit is not None,
        )

    def _emit(
        self,
        key: str,
        item_id: str | None,
        started: float,
        hit: bool,
        attempts: int,
        outcome: str,
        error: str | None,
    ) -> None:
        if self.on_record is None:
            return
        self.on_record(
            CallRecord(
                step=MODERATION_STEP,
                model=f"{self.moderator.name}:{self.model}",
                video_id=item_id,
                cache_key=key,
                latency_s=time.perf_counter() - started,
                cache_hit=hit,
                attempts=attempts,
                outcome=outcome,  # type: ignore[arg-type]
                error=redact(error) if error else None,
            )
        )

    async def moderate_images(self, item_id: str, images: Sequence[ImageInput]) -> ModerationRecord:
        """The decision on an item from these images: unsafe if any image is flagged."""
        if not images:
            raise InputError(f"{item_id}: no images to moderate")
        scored = list(await asyncio.gather(*(self.score(i, item_id) for i in images)))
        flagged = [s for s in scored if s.flagged]
        if flagged:
            first = flagged[0]
            where = (
                f"the frame at {first.timestamp:.1f}s"
                if first.timestamp is not None
                else Path(first.path).name
            )
            category = first.flagged[0]
            reason = (
                f"{len(flagged)} of {len(scored)} image(s) flagged; {where}: {category} "
                f"{first.scores[category]:g} >= {self.thresholds[category]:g}"
            )
        else:
            reason = f"all {len(scored)} image(s) under every threshold"
        return ModerationRecord(
            item_id=item_id,
            provider=self.moderator.name,
            model=self.model,
            thresholds=dict(sorted(self.thresholds.items())),
            thresholds_version=thresholds_version(self.thresholds),
            images=scored,
            safe=not flagged,
            reason=reason,
        )

    async def moderate_video(
        self, video_id: str, frames: Sequence[Frame], seed: int = 0
    ) -> ModerationRecord:
        """A video's decision from ``frames_per_video`` of its frames picked at random
        (seeded by ``seed`` and the video id, so a rerun picks the same ones)."""
        if not frames:
            raise InputError(f"video {video_id!r} has no frames to moderate")
        chosen = pick_frames(frames, self.settings.frames_per_video, seed, video_id)
        return await self.moderate_images(video_id, [ImageInput.from_frame(f) for f in chosen])


def open_cache(path: str | Path) -> Any:
    """A moderation cache in its own folder (diskcache, never evicting), for use outside a
    run; inside one, the run's call cache serves."""
    from vkr_core.backends import DiskCallCache

    return DiskCallCache.open_dir(Path(path))


@hookimpl
def vkr_register_providers(register: Any) -> None:
    register(AzureContentSafety())
    register(OpenAIModeration())
