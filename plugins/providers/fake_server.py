"""A loopback model server with scripted behaviour, speaking OpenAI chat completions, Anthropic
Messages and Gemini generateContent on one port.

Tests and ``vkr demo`` run the pipeline through the real litellm client over HTTP to this
server, so request serialisation, retries, refusals and cost accounting are exercised the
way a real provider exercises them. It ships in the package so third-party plugin authors
can test the same way.

Ground truth needs no shared state: a generated question carries a tag
``[q:XXXXXXXX:mc]`` or ``[q:XXXXXXXX:oe]`` and the true answer is a pure function of the
tag (:func:`truth_for_tag`), so a restarted server, or another one, grades the same way.
Content decisions (right or wrong, malformed, refusal, which question) are a pure function
of the server seed, model, step, messages (images by sha256) and the request's ``seed``;
transport faults (429, 5xx, hangs) come from a seeded random stream per request, so a
retry of the same request can succeed.

The protocols differ only in their envelopes (:mod:`plugins.providers.fake_protocols`): each
request becomes one :class:`ChatRequest`, and the decisions, policy and stats above are the
same whichever protocol carried it.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import json
import math
import random
import re
import secrets
import signal
import sys
import threading
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from aiohttp import web

from plugins.providers.fake_policy import (
    Knobs,
    ServerPolicy,
    dump_policy,
    load_policy,
    parse_policy,
)
from plugins.providers.fake_protocols import (
    PROTOCOL_HANDLERS,
    PROTOCOLS,
    REFUSAL_TEXT,
    Answer,
    BadRequest,
    ChatRequest,
    Fault,
    Protocol,
    openai_error,
    parse_chat_request,
)

# The command lives in fake_server_cli, the built-in plugin, so that loading the plugins
# does not import this server; re-exported for code that registers it from here.
from plugins.providers.fake_server_cli import vkr_register_commands
from vkr_core.schemas import InputError, VkrError

__all__ = [
    "vkr_register_commands",
    "DEFAULT_MODELS",
    "PROTOCOLS",
    "ChatRequest",
    "parse_chat_request",
    "protocol_api_base",
    "FakeModelServer",
    "MODEL_BACKED_STEPS",
    "TAG_PATTERN",
    "find_tag",
    "make_tag",
    "truth_for_tag",
    "write_pool",
]

DEFAULT_MODELS: tuple[str, ...] = ("fake-a", "fake-b", "fake-c", "fake-d")
MODEL_BACKED_STEPS: tuple[str, ...] = (
    "example_generation",
    "self_consistency",
    "video_dependency",
    "cot_verification",
    "single_frame_probe",
    "knowledge_points",
    "scenario_generation",
    "search_keywords",
)
STEP_HEADER = "X-Vkr-Step"
API_KEY_ENV = "VKR_FAKE_API_KEY"
# Small but nonzero, so cost accounting shows up in records and reports.
INPUT_COST_PER_TOKEN = 5e-7
OUTPUT_COST_PER_TOKEN = 1.5e-6
TOKENS_PER_IMAGE = 85
# Requests kept for inspection (FakeModelServer.received): enough for a test, bounded for a bench.
RECEIVED_LIMIT = 1000

TAG_PATTERN = re.compile(r"\[q:([0-9a-f]{8}):(mc|oe)\]")
_NUMBERED = re.compile(r"^\s*\d{1,2}[.)]\s+(\S.*)$", re.MULTILINE)
_CLOCK = re.compile(r"(?<![\d:])(\d{1,3}):([0-5]\d)(?![\d:])")

OPEN_ENDED_ANSWERS: tuple[str, ...] = (
    "heat conduction",
    "friction",
    "centripetal force",
    "surface tension",
    "thermal expansion",
    "an exothermic reaction",
    "torque about the pivot",
    "conservation of momentum",
    "evaporation",
    "gravity",
    "air resistance",
    "a lever",
    "capillary action",
    "buoyancy",
    "elastic deformation",
    "oxidation",
)

_OPTION_TEXTS: tuple[str, ...] = (
    "The object is lifted and rotated",
    "The liquid starts to boil",
    "The tool is pressed against the surface",
    "The sample changes colour",
    "The person adjusts the setting",
    "Nothing changes between the frames",
    "The material is cut into two pieces",
    "The object slides to a stop",
    "The part is fastened in place",
    "The mixture separates into layers",
    "The container is tilted to pour",
    "The surface is heated evenly",
)

_QUESTION_TEMPLATES: tuple[str, ...] = (
    "At {clock}, what is the main action being performed, and why does it work?",
    "Based on what is visible at {clock}, what happens next in the video?",
    "Which principle best explains what is shown at {clock}?",
    "What is the purpose of the step shown at {clock}?",
    "What changes between the frame at {clock} and the following frames?",
)

_OBSERVATIONS: tuple[str, ...] = (
    "the hands hold the tool at an angle over the work surface",
    "the object in the centre of the frame is being moved",
    "the material visibly changes shape",
    "the person pauses before the next step",
    "a tool is in contact with the surface",
    "the contents of the container start to move",
)

_KNOWLEDGE: tuple[str, ...] = (
    "In this discipline this step is done to control the outcome of the next one",
    "Standard practice is to apply force gradually to avoid damage",
    "Heat and motion here follow the usual physical principles",
    "This is the expected order of steps in the procedure",
)


# ---------------------------------------------------------------- ground truth


def make_tag(hex8: str, kind: str) -> str:
    """The tag a generated question carries: ``[q:<8 hex>:<mc|oe>]``."""
    tag = f"[q:{hex8}:{kind}]"
    if not TAG_PATTERN.fullmatch(tag):
        raise ValueError(f"not a valid question tag: {tag!r}")
    return tag


def truth_for_tag(tag: str) -> str:
    """The true answer of the question carrying ``tag``: a letter (mc) or a short phrase (oe)."""
    match = TAG_PATTERN.search(tag)
    if not match:
        raise ValueError(f"no question tag like [q:0123abcd:mc] in {tag!r}")
    number = int(match.group(1), 16)
    if match.group(2) == "mc":
        return "ABCD"[number % 4]
    return OPEN_ENDED_ANSWERS[number % len(OPEN_ENDED_ANSWERS)]


def find_tag(texts: Iterable[str]) -> str | None:
    """The last question tag in the texts: the candidate under review comes after instructions."""
    found = None
    for text in texts:
        for match in TAG_PATTERN.finditer(text):
            found = match.group(0)
    return found


# ---------------------------------------------------------------- request digest


class Decider:
    """Deterministic draws from (server seed, model, step, messages, seed param)."""

    def __init__(self, server_seed: int, request: ChatRequest):
        blob = json.dumps(
            [server_seed, request.model, request.step, request.normalised_messages, request.seed],
            sort_keys=True,
            separators=(",", ":"),
        )
        self.key = hashlib.sha256(blob.encode()).hexdigest()

    def digest(self, label: str) -> str:
        return hashlib.sha256(f"{self.key}:{label}".encode()).hexdigest()

    def uniform(self, label: str) -> float:
        return int(self.digest(label)[:13], 16) / float(16**13)

    def pick(self, label: str, items: Sequence[Any]) -> Any:
        return items[int(self.digest(label)[:12], 16) % len(items)]

    def integer(self, label: str, low: int, high: int) -> int:
        return low + int(self.digest(label)[:12], 16) % (high - low + 1)


# ---------------------------------------------------------------- reply content


def _clocks(texts: Iterable[str]) -> list[str]:
    seen: list[str] = []
    for text in texts:
        for match in _CLOCK.finditer(text):
            clock = f"{int(match.group(1)):02d}:{match.group(2)}"
            if clock not in seen:
                seen.append(clock)
    return seen


def _reasoning(decider: Decider, clock: str, answer: str, label: str) -> str:
    """2 to 4 numbered steps: what is seen, optionally why, and the conclusion."""
    n_steps = decider.integer(f"{label}:steps", 2, 4)
    lines = [f"At {clock} {decider.pick(f'{label}:obs', _OBSERVATIONS)}."]
    if n_steps >= 3:
        lines.append(f"{decider.pick(f'{label}:know', _KNOWLEDGE)}.")
    if n_steps >= 4:
        lines.append("The other candidate answers do not match what the frames show.")
    lines.append(f"Therefore the answer is {answer}.")
    return "\n".join(f"{i}. {line}" for i, line in enumerate(lines, start=1))


def common_mistake(tag: str) -> str:
    """The wrong answer every model gives to ``tag``'s question when it shares the mistake."""
    truth = truth_for_tag(tag)
    wrong = [a for a in ("ABCD" if truth in "ABCD" else OPEN_ENDED_ANSWERS) if a != truth]
    return wrong[int(hashlib.sha256(tag.encode()).hexdigest()[:8], 16) % len(wrong)]


def _wrong_answer(decider: Decider, truth: str) -> str:
    if truth in "ABCD" and len(truth) == 1:
        return decider.pick("wrong", [letter for letter in "ABCD" if letter != truth])
    return decider.pick("wrong", [a for a in OPEN_ENDED_ANSWERS if a != truth])


def _gate_answer(decider: Decider, request: ChatRequest, knobs: Knobs) -> tuple[str, str]:
    """The gate's answer and the clock it cites, right with probability ``accuracy``."""
    clocks = _clocks(request.texts)
    clock = decider.pick("clock", clocks) if clocks else "00:00"
    tag = find_tag(request.texts)
    if tag is None:
        # Nothing to grade against: answer something plausible and stable.
        return decider.pick("untagged", ["A", "B", "C", "D"]), clock
    truth = truth_for_tag(tag)
    if decider.uniform("correct") < knobs.accuracy:
        return truth, clock
    if knobs.mistake > 0:
        return common_mistake(tag), clock
    return _wrong_answer(decider, truth), clock


def generate_example(
    decider: Decider, request: ChatRequest, knobs: Knobs | None = None
) -> dict[str, Any]:
    """A GeneratedExample whose question carries its ground-truth tag (and whose answer is
    the tag's common mistake with probability ``mistake``)."""
    hex8 = decider.digest("tag")[:8]
    kind = "oe" if int(hex8, 16) % 3 == 0 else "mc"
    tag = make_tag(hex8, kind)
    truth = truth_for_tag(tag)
    if knobs is not None and decider.uniform("mistake") < knobs.mistake:
        truth = common_mistake(tag)
    clocks = _clocks(request.texts)
    clock = decider.pick("clock", clocks) if clocks else "00:00"
    question = f"{tag} {decider.pick('template', _QUESTION_TEMPLATES).format(clock=clock)}"
    example: dict[str, Any] = {
        "problem_type": "open-ended" if kind == "oe" else "multiple choice",
        "question": question,
        "answer": truth,
        "reasoning": _reasoning(decider, clock, truth, "gen"),
    }
    if kind == "mc":
        start = decider.integer("options", 0, len(_OPTION_TEXTS) - 1)
        texts = [_OPTION_TEXTS[(start + i) % len(_OPTION_TEXTS)] for i in range(4)]
        example["options"] = [
            f"{letter}. {text}" for letter, text in zip("ABCD", texts, strict=True)
        ]
    return example


def check_reasoning(decider: Decider, request: ChatRequest, knobs: Knobs) -> dict[str, Any]:
    """A CoTCheck that passes with probability ``cot_pass``; a fail has a critical unsupported step."""
    clocks = _clocks(request.texts)
    clock = decider.pick("clock", clocks) if clocks else "00:00"
    # Quote the trace under review when it is numbered, as a real verifier would.
    quoted = [m.group(1).strip()[:160] for t in request.texts for m in _NUMBERED.finditer(t)]
    if len(quoted) >= 2:
        texts = quoted[:4]
    else:
        count = decider.integer("cot:steps", 2, 4)
        texts = [f"At {clock} {decider.pick('cot:obs', _OBSERVATIONS)}"]
        texts += [f"{decider.pick(f'cot:know{i}', _KNOWLEDGE)}" for i in range(1, count)]
    steps: list[dict[str, Any]] = [
        {"step": text, "support": "visual" if i == 0 else "knowledge", "critical": i == 0}
        for i, text in enumerate(texts)
    ]
    steps[0]["note"] = f"visible at {clock}"
    n_steps = len(steps)
    if decider.uniform("cot_pass") < knobs.cot_pass:
        return {
            "steps": steps,
            "rules_out_alternatives": True,
            "verdict": "pass",
            "reason": "every key step is supported by the frames or standard knowledge",
        }
    bad = decider.integer("cot:bad", 1, n_steps)
    steps[bad - 1].update(
        {"support": "unsupported", "critical": True, "note": "no frame shows this"}
    )
    return {
        "steps": steps,
        "rules_out_alternatives": False,
        "verdict": "fail",
        "reason": f"step {bad} is a critical claim that no frame or standard knowledge supports",
    }


_REFERENCE = re.compile(r"<reference-answer>\s*(.*?)\s*</reference-answer>", re.DOTALL)
_CANDIDATE = re.compile(r"<candidate-answer>\s*(.*?)\s*</candidate-answer>", re.DOTALL)


def judge_equivalence(decider: Decider, request: ChatRequest, knobs: Knobs) -> dict[str, Any]:
    """An EquivalenceJudgement that tells the truth with probability ``accuracy``.

    The truth is whether the <candidate-answer> block says the <reference-answer> block's
    answer, compared case- and space-insensitively.
    """
    text = "\n".join(request.texts)
    reference, candidate = _REFERENCE.search(text), _CANDIDATE.search(text)
    if reference is None or candidate is None:
        return {"same": False, "reason": "no reference or candidate answer to compare"}

    def norm(value: str) -> str:
        return " ".join(value.lower().split()).strip(" .")

    same = norm(reference.group(1)) == norm(candidate.group(1))
    if decider.uniform("correct") >= knobs.accuracy:
        same = not same
    return {"same": same, "reason": "same answer" if same else "a different answer"}


RELEVANCE_STEPS: tuple[str, ...] = ("metadata_relevance", "visual_relevance")


def judge_relevance(decider: Decider, request: ChatRequest, knobs: Knobs) -> dict[str, Any]:
    """A RelevanceJudgement: relevant with probability ``relevant``, citing a frame's clock
    when the request shows frames."""
    # A title that calls itself off-topic is judged so, as any model would: tests script a
    # candidate the metadata judge turns down whatever the share.
    off_topic = "off-topic" in _fenced(request, "video title").casefold()
    relevant = not off_topic and decider.uniform("relevant") < knobs.relevant
    clocks = _clocks(request.texts) if request.image_hashes else []
    seen = (
        f"the frame at {decider.pick('clock', clocks)}" if clocks else "the title and description"
    )
    verdict = "shows the scenario" if relevant else "does not show the scenario"
    return {"relevant": relevant, "reason": f"{seen} {verdict}"}


def reply_content(decider: Decider, request: ChatRequest, knobs: Knobs) -> dict[str, Any]:
    """The JSON object a well-behaved model would return for this step."""
    step = request.step
    if step in RELEVANCE_STEPS:
        return judge_relevance(decider, request, knobs)
    if step in KNOWLEDGE_STEPS:
        return KNOWLEDGE_STEPS[step](decider, request)
    if step == "example_generation":
        return generate_example(decider, request, knobs)
    if step == "judge_equivalence":
        return judge_equivalence(decider, request, knobs)
    if step == "cot_verification":
        return check_reasoning(decider, request, knobs)
    answer, clock = _gate_answer(decider, request, knobs)
    if step in ("self_consistency", "single_frame_probe"):
        return {"reasoning": _reasoning(decider, clock, answer, "solve"), "answer": answer}
    return {"answer": answer}


_FENCED = re.compile(r'<untrusted-data name="([^"]+)"[^>]*>\n(.*?)\n</untrusted-data>', re.DOTALL)


def _fenced(request: ChatRequest, name: str) -> str:
    """The text of the first fenced block called ``name`` in the request ("" if none)."""
    for text in request.texts:
        for match in _FENCED.finditer(text):
            if match.group(1) == name:
                return match.group(2).strip()
    return ""


def _words(text: str, count: int) -> str:
    return " ".join(text.split()[:count]).strip(" .,;:")


def knowledge_points(decider: Decider, request: ChatRequest) -> dict[str, Any]:
    """PointDrafts: the lecture title and the head of each objective, 1-4 distinct terms."""
    title = _words(_fenced(request, "lecture title") or "the lecture", 8)
    objectives = [
        line.removeprefix("- ").strip()
        for line in _fenced(request, "objectives").splitlines()
        if line.strip() and line.strip() != "(none given)"
    ]
    terms = [title] + [_words(o, 4) for o in objectives]
    distinct: list[str] = []
    for term in terms:
        if term and term.casefold() not in {d.casefold() for d in distinct}:
            distinct.append(term)
    count = decider.integer("points", 1, min(4, len(distinct)))
    return {
        "points": [
            {
                "term": term,
                "definition": (
                    f"{term} is a core idea of the lecture {title!r}. It names what a student "
                    "must recognise when it happens and explain with the subject's standard "
                    "principles."
                ),
            }
            for term in distinct[:count]
        ]
    }


_SCENES: tuple[str, ...] = (
    "A workshop video in which {term} decides how the job turns out, filmed close up.",
    "Outdoor footage of an everyday event where {term} is plainly at work.",
    "A professional at work in a lab or on a site, relying on {term} at a key moment.",
    "A sports or vehicle clip in which {term} shapes what the viewer sees happen.",
)


def scenario_generation(decider: Decider, request: ChatRequest) -> dict[str, Any]:
    """Scenarios: 1-3 distinct scenes that embody the fenced term."""
    term = _words(_fenced(request, "term") or "the knowledge point", 8)
    count = decider.integer("scenarios", 1, 3)
    start = decider.integer("scene", 0, len(_SCENES) - 1)
    scenes = [_SCENES[(start + i) % len(_SCENES)].format(term=term) for i in range(count)]
    return {"scenarios": scenes}


def search_keywords(decider: Decider, request: ChatRequest) -> dict[str, Any]:
    """SearchKeywords: 1-3 distinct queries from the term and the scenario."""
    term = _words(_fenced(request, "term") or "knowledge point", 5)
    scenario = _words(_fenced(request, "scenario") or "real footage", 6)
    options = [f"{term} in action", f"{term} {decider.pick('kw', ('footage', 'real world'))}"]
    options.append(scenario)
    count = decider.integer("keywords", 1, 3)
    return {"keywords": list(dict.fromkeys(k.casefold() for k in options))[:count]}


KNOWLEDGE_STEPS = {
    "knowledge_points": knowledge_points,
    "scenario_generation": scenario_generation,
    "search_keywords": search_keywords,
}


def schema_violation(decider: Decider, good: dict[str, Any], schema: dict[str, Any]) -> str:
    """Valid JSON that breaks ``schema``: a required field left out, else a field of the wrong type."""
    broken = dict(good)
    required = [k for k in schema.get("required") or [] if isinstance(k, str) and k in good]
    if required:
        broken.pop(decider.pick("violate:field", required))
        return json.dumps(broken)
    properties = schema.get("properties") or {}
    if isinstance(properties, dict) and properties:
        name = decider.pick("violate:field", sorted(properties))
        kind = properties[name].get("type") if isinstance(properties[name], dict) else None
        broken[name] = 12345 if kind == "string" else "not what the schema allows"
        return json.dumps(broken)
    # A schema with no fields to break: an array is not the object every step's schema is.
    return json.dumps([broken])


def malformed_content(decider: Decider, good: dict[str, Any]) -> str:
    """A reply that is broken JSON, prose, or JSON in the wrong shape."""
    text = json.dumps(good)
    variant = decider.pick("malformed:kind", ("truncated", "prose", "wrong_keys"))
    if variant == "truncated":
        return text[: max(1, len(text) // 2)]
    if variant == "prose":
        return "Sure! Looking at the frames, I think the answer is probably the second one."
    return json.dumps({"result": "see reasoning above", "confidence": "high"})


# ---------------------------------------------------------------- statistics


@dataclass
class Stats:
    requests: int = 0
    completions: int = 0
    by_model: dict[str, int] = field(default_factory=dict)
    by_step: dict[str, int] = field(default_factory=dict)
    by_model_step: dict[str, int] = field(default_factory=dict)
    # Billed completions by the protocol the request came in on (openai, anthropic, gemini).
    by_protocol: dict[str, int] = field(default_factory=dict)
    faults: dict[str, int] = field(default_factory=dict)
    auth_present: int = 0
    auth_missing: int = 0
    # Keyed HMACs of keys seen, with a per-process secret: counts distinct keys without
    # keeping anything that could recover or confirm a key.
    auth_fingerprints: set[str] = field(default_factory=set)
    # Completions of a request identical to one already completed: calls paid twice.
    billed: set[str] = field(default_factory=set)
    repeats: int = 0
    # vkr's cache keys (X-Vkr-Call) of the repeated completions, to tell which were lost
    # on the wire and which had reached vkr.
    repeated_call_keys: list[str] = field(default_factory=list)
    # The most requests of a model the server held at once (parsed, not yet answered): what a
    # test of a concurrency limit, local or cluster-wide, reads.
    peak_in_flight: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "completions": self.completions,
            "repeats": self.repeats,
            "repeated_call_keys": list(self.repeated_call_keys),
            "by_model": dict(sorted(self.by_model.items())),
            "by_step": dict(sorted(self.by_step.items())),
            "by_model_step": dict(sorted(self.by_model_step.items())),
            "by_protocol": dict(sorted(self.by_protocol.items())),
            "peak_in_flight": dict(sorted(self.peak_in_flight.items())),
            "faults": dict(sorted(self.faults.items())),
            "authorization": {
                "present": self.auth_present,
                "missing": self.auth_missing,
                "distinct": len(self.auth_fingerprints),
            },
        }


def _bump(table: dict[str, int], key: str) -> None:
    table[key] = table.get(key, 0) + 1


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# ---------------------------------------------------------------- the server


class FakeModelServer:
    """A scripted model server on loopback, in a background thread.

    ``with FakeModelServer(policy={"accuracy": 0.9}) as server: server.base_url`` gives a
    URL like ``http://127.0.0.1:PORT/v1`` to use as litellm's ``api_base`` for ``openai/``
    and ``gemini/`` models; ``server.api_base("anthropic")`` (the root) is the one for
    ``anthropic/`` models.
    """

    def __init__(self, policy: dict[str, Any] | ServerPolicy | None = None, seed: int = 0):
        self.seed = seed
        self._policy = parse_policy(policy)
        self._lock = threading.Lock()
        self._stats = Stats()
        self._received: deque[ChatRequest] = deque(maxlen=RECEIVED_LIMIT)
        self._auth_secret = secrets.token_bytes(16)
        self._transport_rng = random.Random(seed)
        # Its own stream: a tail on the latency leaves the transport faults' draws as they were.
        self._latency_rng = random.Random(seed)
        self._script_cursors: dict[tuple[str, str], int] = {}
        self._in_flight: dict[str, int] = {}  # requests of each model being answered now
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self._stopping: asyncio.Event | None = None
        self.base_url: str | None = None
        self._address: tuple[str, int] | None = None

    # -- lifecycle

    def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Serve on ``host:port`` (0 = any free port) and return the base URL ending in /v1.

        On a running server (e.g. inside ``with``), asking for the address it already has, or
        for any port, returns the current URL; asking for another address moves the server
        there, keeping its policy and stats.
        """
        if not _is_loopback(host):
            raise InputError(
                f"the fake model server only listens on loopback, not on {host!r}: "
                "use 127.0.0.1, ::1 or localhost"
            )
        if self._thread is not None:
            assert self.base_url is not None
            if port == 0 or (host, port) == self._address:
                return self.base_url
            self.stop()
        ready = threading.Event()
        failure: list[BaseException] = []

        def serve() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            asyncio.set_event_loop(loop)
            try:
                self.base_url = loop.run_until_complete(self._open(host, port))
            except BaseException as exc:  # reported to the caller of start()
                failure.append(exc)
                ready.set()
                loop.close()
                return
            ready.set()
            try:
                loop.run_forever()
            finally:
                loop.close()

        self._thread = threading.Thread(target=serve, name="vkr-fake-model-server", daemon=True)
        self._thread.start()
        ready.wait()
        if failure:
            self._thread.join()
            self._thread = None
            exc = failure[0]
            if isinstance(exc, OSError):
                raise InputError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
            raise exc
        assert self.base_url is not None
        self._address = (host, int(self.base_url.rsplit(":", 1)[1].split("/")[0]))
        return self.base_url

    async def _open(self, host: str, port: int) -> str:
        self._stopping = asyncio.Event()
        app = web.Application(client_max_size=256 * 1024**2)
        app.router.add_post("/v1/chat/completions", self._handle_completion)
        app.router.add_post("/chat/completions", self._handle_completion)
        # Anthropic's client appends /v1/messages to its api_base: the server root.
        app.router.add_post("/v1/messages", self._handle_anthropic)
        # Gemini's client posts to {api_base}/models/{model}:generateContent.
        app.router.add_post("/v1/models/{target}", self._handle_gemini)
        app.router.add_post("/v1beta/models/{target}", self._handle_gemini)
        app.router.add_get("/v1/models", self._handle_models)
        app.router.add_get("/models", self._handle_models)
        app.router.add_get("/stats", self._handle_stats)
        app.router.add_post("/stats/reset", self._handle_stats_reset)
        app.router.add_get("/policy", self._handle_get_policy)
        app.router.add_post("/policy", self._handle_set_policy)
        app.router.add_get("/health", self._handle_health)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port, shutdown_timeout=1.0)
        await site.start()
        sockname = site._server.sockets[0].getsockname()  # type: ignore[union-attr]
        bound_host = f"[{sockname[0]}]" if ":" in sockname[0] else sockname[0]
        return f"http://{bound_host}:{sockname[1]}/v1"

    def stop(self) -> None:
        """Release hung requests, close connections and end the server thread."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return

        async def close() -> None:
            assert self._stopping is not None
            self._stopping.set()
            if self._runner is not None:
                await self._runner.cleanup()

        asyncio.run_coroutine_threadsafe(close(), loop).result(timeout=30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=30)
        self._thread = None
        self._loop = None
        self._runner = None

    def __enter__(self) -> FakeModelServer:
        if self._thread is None:
            self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- control

    def stats(self) -> dict[str, Any]:
        """Counts of requests, billed completions by model and step, and faults served."""
        with self._lock:
            return self._stats.as_dict()

    def api_base(self, protocol: str = "openai") -> str:
        """The litellm ``api_base`` that reaches this server on ``protocol``."""
        assert self.base_url is not None, "the server is not started"
        return protocol_api_base(self.base_url, protocol)

    def received(self, step: str | None = None) -> list[ChatRequest]:
        """The last requests the server parsed (at most RECEIVED_LIMIT), oldest first.

        Each has the model, the step (from vkr's step header), the texts of its messages and
        the sha256 of each image: what a test checks to see what a model was really shown.
        """
        with self._lock:
            return [r for r in self._received if step is None or r.step == step]

    def reset_stats(self) -> None:
        with self._lock:
            self._stats = Stats()

    def clear_received(self) -> None:
        """Forget the requests kept for :meth:`received`, so a test sees only its own."""
        with self._lock:
            self._received.clear()

    def set_policy(self, policy: dict[str, Any] | ServerPolicy) -> None:
        """Replace the policy; scripts start again from their first outcome."""
        parsed = parse_policy(policy)
        with self._lock:
            self._policy = parsed
            self._script_cursors = {}
            self._transport_rng = random.Random(self.seed)
            self._latency_rng = random.Random(self.seed)

    @property
    def policy(self) -> ServerPolicy:
        return self._policy

    # -- request handling

    def _decide_outcome(self, model: str, knobs: Knobs, script_scope: str) -> str:
        """The scripted outcome if one is left, else a transport draw (``ok`` if none hits)."""
        with self._lock:
            if knobs.script:
                cursor_key = (model, script_scope)
                position = self._script_cursors.get(cursor_key, 0)
                if position < len(knobs.script):
                    self._script_cursors[cursor_key] = position + 1
                    return knobs.script[position]
            rng = self._transport_rng
            draws = (rng.random(), rng.random(), rng.random(), rng.random())
        if draws[0] < knobs.rate_limit:
            return "429"
        if draws[1] < knobs.server_error:
            return "500" if draws[3] < 0.5 else "503"
        if draws[2] < knobs.hang:
            return "hang"
        return "content"

    def _record_auth(self, header: str | None) -> None:
        if not header:
            self._stats.auth_missing += 1
            return
        self._stats.auth_present += 1
        mac = hmac.new(self._auth_secret, header.encode(), hashlib.sha256).hexdigest()
        self._stats.auth_fingerprints.add(mac)

    def _fault(self, name: str) -> None:
        with self._lock:
            _bump(self._stats.faults, name)

    async def _handle_completion(self, request: web.Request) -> web.Response:
        return await self._handle(PROTOCOL_HANDLERS["openai"], request)

    async def _handle_anthropic(self, request: web.Request) -> web.Response:
        return await self._handle(PROTOCOL_HANDLERS["anthropic"], request)

    async def _handle_gemini(self, request: web.Request) -> web.Response:
        model, _, method = request.match_info["target"].partition(":")
        if method != "generateContent":
            protocol = PROTOCOL_HANDLERS["gemini"]
            with self._lock:
                self._stats.requests += 1
            return self._render_fault(
                protocol,
                Fault(
                    "bad_request",
                    f"method {method or '(none)'!r} is not supported by the fake model server "
                    "(only generateContent, no streaming)",
                ),
                "400",
            )
        return await self._handle(PROTOCOL_HANDLERS["gemini"], request, path_model=model)

    def _render_fault(self, protocol: Protocol, fault: Fault, name: str | None) -> web.Response:
        if name is not None:
            self._fault(name)
        rendered = protocol.fault(fault)
        return web.json_response(rendered.body, status=rendered.status, headers=rendered.headers)

    async def _handle(
        self, protocol: Protocol, request: web.Request, path_model: str | None = None
    ) -> web.Response:
        """One request on any protocol: parse to a ChatRequest, decide, reply in its words."""
        with self._lock:
            self._stats.requests += 1
            self._record_auth(protocol.credential(request.headers, request.query))
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            message = f"request body is not valid JSON: {exc}"
            return self._render_fault(protocol, Fault("bad_request", message), "400")
        try:
            chat = protocol.parse(body, request.headers.get(STEP_HEADER), path_model)
        except BadRequest as exc:
            return self._render_fault(protocol, Fault("bad_request", str(exc)), "400")
        with self._lock:
            self._in_flight[chat.model] = self._in_flight.get(chat.model, 0) + 1
            peaks = self._stats.peak_in_flight
            peaks[chat.model] = max(peaks.get(chat.model, 0), self._in_flight[chat.model])
        try:
            return await self._answer(protocol, request, chat)
        finally:
            with self._lock:
                self._in_flight[chat.model] -= 1

    async def _answer(
        self, protocol: Protocol, request: web.Request, chat: ChatRequest
    ) -> web.Response:
        """A parsed request's reply: latency, then a fault or a completion, per the policy."""
        with self._lock:
            self._received.append(chat)
            knobs, script_scope = self._policy.resolve(chat.model, chat.step)
            delay_ms = knobs.latency_ms
            if knobs.latency_tail_ms:
                delay_ms += self._latency_rng.expovariate(1 / knobs.latency_tail_ms)
        if delay_ms:
            await asyncio.sleep(delay_ms / 1000)
        outcome = self._decide_outcome(chat.model, knobs, script_scope)

        # Faults are counted by outcome, not by the status a protocol words them with
        # (Anthropic's overload is 529), so stats read the same for every protocol.
        if outcome == "429":
            retry_after = knobs.retry_after_s
            message = (
                f"Rate limit reached for {chat.model} (fake model server). "
                f"Please try again in {retry_after:g}s."
            )
            return self._render_fault(protocol, Fault("rate_limit", message, retry_after), "429")
        if outcome == "500":
            message = "The server had an error while processing your request (fake model server)."
            return self._render_fault(protocol, Fault("server_error", message), "500")
        if outcome == "503":
            message = "The engine is currently overloaded (fake model server)."
            return self._render_fault(protocol, Fault("overloaded", message), "503")
        if outcome == "hang":
            self._fault("hang")  # counted now: a test reads stats while the request hangs
            assert self._stopping is not None
            try:
                await asyncio.wait_for(self._stopping.wait(), timeout=knobs.hang_s)
            except TimeoutError:
                pass
            message = "the request hung (fake model server)"
            return self._render_fault(protocol, Fault("timeout", message), None)
        answer = self._complete(
            chat, knobs, forced=outcome, call_key=request.headers.get("X-Vkr-Call")
        )
        return web.json_response(protocol.reply(chat, answer))

    def _complete(
        self, chat: ChatRequest, knobs: Knobs, forced: str, call_key: str | None = None
    ) -> Answer:
        """Decide the reply and bill it; the protocol only words it."""
        decider = Decider(self.seed, chat)
        good = reply_content(decider, chat, knobs)
        schema = chat.response_schema
        if forced == "blocked" or (
            forced == "content" and decider.uniform("blocked") < knobs.blocked
        ):
            text, kind = REFUSAL_TEXT, "blocked"
        elif forced == "refusal" or (
            forced == "content" and decider.uniform("refusal") < knobs.refusal
        ):
            text, kind = REFUSAL_TEXT, "refusal"
        elif forced == "malformed" or (
            forced == "content"
            and not (knobs.needs_schema and schema is not None)
            and decider.uniform("malformed") < knobs.malformed
        ):
            text, kind = malformed_content(decider, good), "malformed"
        elif forced == "content" and knobs.needs_schema and schema is None:
            # A model that keeps to the format only when decoding is held to a schema.
            text, kind = malformed_content(decider, good), "malformed"
        elif (
            forced == "content"
            and schema is not None
            and decider.uniform("violate_schema") < knobs.violate_schema
        ):
            text, kind = schema_violation(decider, good, schema), "schema_violation"
        else:
            text, kind = json.dumps(good), "ok"
        prompt_tokens = max(1, math.ceil(chat.text_chars() / 4)) + TOKENS_PER_IMAGE * len(
            chat.image_hashes
        )
        answer = Answer(
            model=chat.model,
            text=text,
            kind=kind,
            prompt_tokens=prompt_tokens,
            completion_tokens=max(1, math.ceil(len(text) / 4)),
            reply_id=decider.key[:24],
        )
        with self._lock:
            stats = self._stats
            stats.completions += 1
            # Per protocol: the same question put to two vendors is two bills, not a repeat.
            fingerprint = f"{chat.protocol}:{Decider(0, chat).key}"
            if fingerprint in stats.billed:
                stats.repeats += 1
                if call_key:
                    stats.repeated_call_keys.append(call_key)
            stats.billed.add(fingerprint)
            _bump(stats.by_model, chat.model)
            _bump(stats.by_step, chat.step)
            _bump(stats.by_model_step, f"{chat.model}|{chat.step}")
            _bump(stats.by_protocol, chat.protocol)
            if kind != "ok":
                _bump(stats.faults, kind)
        return answer

    async def _handle_models(self, request: web.Request) -> web.Response:
        with self._lock:
            names = set(DEFAULT_MODELS) | set(self._policy.models)
        return web.json_response(
            {
                "object": "list",
                "data": [
                    {"id": name, "object": "model", "created": 0, "owned_by": "vkr-fake"}
                    for name in sorted(names)
                ],
            }
        )

    async def _handle_stats(self, request: web.Request) -> web.Response:
        return web.json_response(self.stats())

    async def _handle_stats_reset(self, request: web.Request) -> web.Response:
        self.reset_stats()
        return web.json_response(self.stats())

    async def _handle_get_policy(self, request: web.Request) -> web.Response:
        with self._lock:
            text = dump_policy(self._policy)
        return web.Response(text=text, content_type="application/json")

    async def _handle_set_policy(self, request: web.Request) -> web.Response:
        try:
            data = await request.json()
            self.set_policy(data)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            return web.json_response(
                openai_error(f"policy is not valid JSON: {exc}", "invalid_request_error", None),
                status=400,
            )
        except InputError as exc:
            return web.json_response(
                openai_error(str(exc), "invalid_request_error", None), status=400
            )
        return await self._handle_get_policy(request)

    async def _handle_health(self, request: web.Request) -> web.Response:
        return web.json_response({"ok": True})


# ---------------------------------------------------------------- pool and registry


def protocol_api_base(base_url: str, protocol: str) -> str:
    """The ``api_base`` for ``protocol`` of the server whose OpenAI base URL is ``base_url``.

    litellm posts OpenAI and Gemini requests under the base it is given (``/v1/chat/completions``,
    ``/v1/models/{model}:generateContent``) but appends ``/v1/messages`` to an Anthropic one, so
    Anthropic's base is the server root.
    """
    if protocol not in PROTOCOLS:
        raise InputError(f"unknown protocol {protocol!r}: expected one of {', '.join(PROTOCOLS)}")
    if protocol == "anthropic":
        return base_url.removesuffix("/").removesuffix("/v1")
    return base_url


def write_pool(
    pool_path: str | Path,
    base_url: str,
    models: Sequence[str] = DEFAULT_MODELS,
    registry_path: str | Path | None = None,
    pm: Any = None,
    protocols: Mapping[str, str] | None = None,
) -> Path:
    """Write a pool YAML of fake models at ``base_url`` and a registry marking them all eligible.

    The registry goes to ``registry_path`` (default: ``<pool stem>-registry.yaml`` beside the
    pool). Each model-backed step gets an entry per model; when ``pm`` is a loaded plugin
    manager, entries carry the step's current prompt version so they are not stale.
    ``protocols`` maps some model names to ``openai`` (the default), ``anthropic`` or
    ``gemini``: each entry then reaches the server on that protocol (``anthropic/fake-b``
    at the server root, ``gemini/fake-c`` at ``base_url``), priced like the others.
    Returns the pool path.
    """
    names = list(models)
    if not names:
        raise InputError("write_pool needs at least one model name")
    if len(set(names)) != len(names):
        raise InputError(f"write_pool got a model name twice: {names}")
    chosen = dict(protocols or {})
    unknown_names = sorted(set(chosen) - set(names))
    if unknown_names:
        raise InputError(f"write_pool protocols name models not in the pool: {unknown_names}")
    for name, protocol in chosen.items():
        if protocol not in PROTOCOLS:
            raise InputError(
                f"write_pool: model {name!r} has protocol {protocol!r}; "
                f"expected one of {', '.join(PROTOCOLS)}"
            )
    pool_file = Path(pool_path)
    registry_file = (
        Path(registry_path)
        if registry_path is not None
        else pool_file.with_name(f"{pool_file.stem}-registry.yaml")
    )
    registered_steps: dict[str, Any] = {}
    if pm is not None:
        registered_steps = dict(getattr(getattr(pm, "registry", None), "steps", {}) or {})
    step_names = sorted(set(MODEL_BACKED_STEPS) | set(registered_steps))

    registry: dict[str, dict[str, dict[str, Any]]] = {}
    for step_name in step_names:
        entry: dict[str, Any] = {"eligible": True, "error_rate": 0.0, "n": 100}
        step = registered_steps.get(step_name)
        if step is not None:
            entry["prompt_version"] = step.version()
        registry[step_name] = {name: dict(entry) for name in names}

    if registry_file.resolve().parent == pool_file.resolve().parent:
        registry_ref = registry_file.name  # relative refs keep the pair movable together
    else:
        registry_ref = str(registry_file.resolve())
    pool = {
        "models": [
            {
                "name": name,
                "model": f"{chosen.get(name, 'openai')}/{name}",
                "api_base": protocol_api_base(base_url, chosen.get(name, "openai")),
                "api_key_env": API_KEY_ENV,
                "modality": ["text", "vision"],
                "max_concurrency": 8,
                "input_cost_per_token": INPUT_COST_PER_TOKEN,
                "output_cost_per_token": OUTPUT_COST_PER_TOKEN,
            }
            for name in names
        ],
        # The paper uses a fixed pair of models for the video-dependency check.
        "steps": {"video_dependency": {"models": names[-2:]}},
        "registry": registry_ref,
    }
    pool_file.parent.mkdir(parents=True, exist_ok=True)
    registry_file.parent.mkdir(parents=True, exist_ok=True)
    registry_file.write_text(yaml.safe_dump(registry, sort_keys=True))
    pool_file.write_text(yaml.safe_dump(pool, sort_keys=False))
    return pool_file


# ---------------------------------------------------------------- CLI


def serve_forever(
    host: str,
    port: int,
    seed: int,
    policy_file: str | None,
    pool_file: str | None,
    echo: Any = print,
    protocols: Mapping[str, str] | None = None,
) -> None:
    """Run the server in the foreground until SIGINT or SIGTERM (``vkr dev fake-server``)."""
    policy = load_policy(policy_file) if policy_file else None
    pm = None
    if pool_file:
        from vkr_core.plugins import get_plugin_manager

        try:
            pm = get_plugin_manager()
        except (VkrError, ImportError) as exc:
            # Prompt versions are optional in the registry; the pool is still useful without.
            print(
                f"note: plugins did not load ({exc}); the registry has no prompt versions",
                file=sys.stderr,
            )
    server = FakeModelServer(policy=policy, seed=seed)
    base_url = server.start(host=host, port=port)
    done = threading.Event()
    previous = {
        sig: signal.signal(sig, lambda *_: done.set()) for sig in (signal.SIGINT, signal.SIGTERM)
    }
    try:
        echo(f"fake model server: {base_url}")
        if pool_file:
            written = write_pool(pool_file, base_url, pm=pm, protocols=protocols)
            echo(f"pool: {written.resolve()}")
            echo(f"set {API_KEY_ENV} to any value before running against this pool")
        for protocol in PROTOCOLS:
            echo(f"{protocol}: api_base {protocol_api_base(base_url, protocol)} ({protocol}/NAME)")
        echo("press Ctrl-C to stop")
        while not done.wait(0.2):
            pass
    finally:
        server.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
