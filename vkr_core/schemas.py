"""One pydantic model per concept the engine owns; a step's own inputs and outputs live with the step."""

from __future__ import annotations

import errno
import functools
import re
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

ProblemType = Literal["multiple choice", "open-ended"]
OPTION_LETTERS = "ABCDEFGHIJ"

# A video id becomes a file name and a checkpoint thread id: keep it to a safe alphabet.
# YouTube ids ([A-Za-z0-9_-]{11}) may start with '-' or '_'; a leading '.' would make a
# hidden file (and '.'/'..' a directory), so never that.
_SAFE_ID = re.compile(r"[A-Za-z0-9_\-][A-Za-z0-9_.\-]{0,127}")


class VkrError(Exception):
    """Base class of the errors vkr reports to a user as a clear one-line message."""


class InputError(VkrError):
    """Bad input from the user: a file, an id, a config value."""


class DiskFull(VkrError):
    """The run directory's disk is full: the whole run stops; rerunning resumes it."""


class RunStopped(VkrError):
    """Something every item needs is gone (say, the database holding the run's state): the
    whole run stops instead of failing item after item; rerunning resumes it."""


def is_disk_full(exc: BaseException) -> bool:
    """ENOSPC/EDQUOT from the OS, or SQLite's 'database or disk is full', here or in what
    caused it (a provider's transport wraps the journal's failed write in its own error)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(current)
        if "No space left on device" in text or "disk is full" in text:
            return True
        current = current.__cause__ or current.__context__
    return False


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def check_video_id(video_id: str) -> str:
    """Return the id if it is safe as a file name and thread id, else raise InputError."""
    if not isinstance(video_id, str) or not _SAFE_ID.fullmatch(video_id) or ".." in video_id:
        raise InputError(
            f"unsafe video id {video_id!r}: use letters, digits, '_', '-' and '.' (not "
            "first), at most 128 characters, no path separators and no '..'"
        )
    return video_id


# Metadata text reaches every generation prompt, so its length is paid for in every round.
# YouTube allows 100-character titles and 5,000-byte descriptions (so at most 5,000
# characters); other sources (course pages, lecture notes) run longer, hence the room on
# titles. A longer value is cut to its cap, and the prompt says so, so a run over thousands
# of videos goes on; a value past METADATA_REFUSE_CHARS is not metadata but a broken
# manifest line (a file pasted into a field), and is refused.
METADATA_CAPS = {
    "title": 1_000,
    "description": 5_000,
    "subject": 500,
    "knowledge_point.term": 500,
    "knowledge_point.definition": 5_000,
}
METADATA_REFUSE_CHARS = 1_000_000
# The discipline is a key (it picks seed examples, strata, report rows): a short label.
DISCIPLINE_MAX_CHARS = 100
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def _refuse_absurd(field: str, value: str, part: str = "") -> str:
    if len(value) > METADATA_REFUSE_CHARS:
        raise PydanticCustomError(
            "metadata_too_long",
            f"{part}{len(value):,} characters is over the {METADATA_REFUSE_CHARS:,}-character "
            f"limit of any metadata field: not a real {field} (fields past their cap of a few "
            "thousand characters are cut; this one is refused)",
        )
    return value


class KnowledgePoint(Strict):
    term: str
    definition: str = ""


class Video(Strict):
    """A video to process, with what is known about it (untrusted text included)."""

    video_id: str
    path: str
    # The path records and exports hold: relative to the run's video root (`vkr run
    # --video-root`, `vkr generate --videos-dir`), POSIX separators, unique per file. None
    # only for a Video built by hand: then the run's root, or else the file name, decides.
    video_path: str | None = None
    discipline: str = "general"
    subject: str = ""
    knowledge_point: KnowledgePoint | None = None
    title: str = ""
    description: str = ""
    # Where the file came from and on what terms (url, license, channel, published_at ...):
    # a Creative-Commons BY licence obliges whoever reuses the video to credit it.
    source: dict[str, str] | None = None
    # Metadata fields cut to METADATA_CAPS: field -> its length in characters before the cut.
    truncated: dict[str, int] = Field(default_factory=dict)

    @field_validator("video_id")
    @classmethod
    def _safe_id(cls, value: str) -> str:
        return check_video_id(value)

    @field_validator("discipline")
    @classmethod
    def _discipline_label(cls, value: str) -> str:
        if _CONTROL.search(value):
            problem = "it has line breaks or control characters"
        elif len(value) > DISCIPLINE_MAX_CHARS:
            problem = f"it is {len(value):,} characters"
        else:
            return value
        raise PydanticCustomError(
            "discipline_label",
            f"the discipline selects seed examples: it must be one line of at most "
            f"{DISCIPLINE_MAX_CHARS} characters, and {problem}",
        )

    @field_validator("title", "description", "subject")
    @classmethod
    def _not_absurd(cls, value: str, info: ValidationInfo) -> str:
        return _refuse_absurd(str(info.field_name), value)

    @field_validator("knowledge_point")
    @classmethod
    def _point_not_absurd(cls, value: KnowledgePoint | None) -> KnowledgePoint | None:
        if value is not None:
            _refuse_absurd("knowledge point term", value.term, "term: ")
            _refuse_absurd("knowledge point definition", value.definition, "definition: ")
        return value

    @model_validator(mode="after")
    def _cap_metadata(self) -> Video:
        # Cutting here, at the edge, keeps the full text out of prompts, checkpoints and
        # records alike. Idempotent: a capped value is never over its cap again, so a video
        # read back from a checkpoint keeps its first ``truncated`` lengths.
        for name in ("title", "description", "subject"):
            value = getattr(self, name)
            if len(value) > METADATA_CAPS[name]:
                self.truncated[name] = len(value)
                setattr(self, name, value[: METADATA_CAPS[name]])
        point = self.knowledge_point
        if point is not None:
            cut = {}
            for name in ("term", "definition"):
                value, cap = getattr(point, name), METADATA_CAPS[f"knowledge_point.{name}"]
                if len(value) > cap:
                    self.truncated[f"knowledge_point.{name}"] = len(value)
                    cut[name] = value[:cap]
            if cut:
                self.knowledge_point = point.model_copy(update=cut)
        return self


class VideoInfo(Strict):
    """What probing a video file found."""

    path: str
    duration: float
    fps: float
    frame_count: int
    width: int
    height: int
    reader: str


class Frame(Strict):
    """One sampled frame, encoded once as JPEG; calls refer to it by content hash."""

    index: int
    timestamp: float
    sha256: str
    path: str
    width: int
    height: int

    @property
    def clock(self) -> str:
        return format_clock(self.timestamp)


@functools.lru_cache(maxsize=4096)
def format_clock(seconds: float) -> str:
    """Timestamp as mm:ss (hours roll into minutes, as in the paper's prompts)."""
    total = int(seconds)
    return f"{total // 60:02d}:{total % 60:02d}"


class FrameSampling(Strict):
    """How a video's frames were sampled (a run's ``fps`` and ``max_frames``)."""

    fps: float = Field(gt=0)
    max_frames: int = Field(ge=1)


class SeedExample(Strict):
    """An expert example shown to the generator; ``skill`` is any registered skill's name."""

    discipline: str
    subject: str = ""
    # Any name: which skills exist is known only once plugins are loaded (vkr_core.seeds checks).
    skill: str = Field(min_length=1)
    question: str
    options: list[str] | None = None
    answer: str
    reasoning: str
    # The frames whose clock times the reasoning cites (vkr seeds records them): the same
    # time falls on other frames, or none, when a run samples otherwise. None: not known.
    sampling: FrameSampling | None = None


class SkillSpec(Strict):
    """A skill as a plugin registers it, with the seed examples it ships (if any)."""

    name: str
    description: str
    uses_knowledge: bool = False
    rounds: int = 2
    guidance: str = ""
    # Used for this skill unless the run's --seed-bank holds examples of it.
    seeds: list[SeedExample] = Field(default_factory=list)

    @model_validator(mode="after")
    def _seeds_are_this_skills(self) -> SkillSpec:
        for number, seed in enumerate(self.seeds, start=1):
            if seed.skill != self.name:
                raise ValueError(
                    f"seed {number} is an example of skill {seed.skill!r}, not {self.name!r}"
                )
        return self


# ---------------------------------------------------------------- pipeline records


class Candidate(Strict):
    """An example moving through the gates."""

    example_id: str
    video_id: str
    skill: str
    round: int
    problem_type: ProblemType
    question: str
    options: list[str] | None = None
    answer: str
    reasoning: str
    models: dict[str, list[str]] = Field(default_factory=dict)
    verdicts: list[Verdict] = Field(default_factory=list)


class Verdict(Strict):
    """A gate's decision on one candidate."""

    step: str
    passed: bool
    reason: str
    models: list[str] = Field(default_factory=list)
    detail: dict[str, Any] = Field(default_factory=dict)
    raw_replies: list[str] = Field(default_factory=list)
    # A gate may replace the trace (a re-derived reasoning becomes the final trace).
    revised_reasoning: str | None = None


class Rejection(Strict):
    """A candidate that did not make it, with where, why and the raw text."""

    example_id: str
    skill: str
    round: int
    step: str
    reason: str
    kind: Literal["gate", "malformed", "refusal", "error"]
    raw_reply: str | None = None
    candidate: Candidate | None = None


class AcceptedExample(Strict):
    """An example in the VideoKR release fields plus provenance."""

    problem_id: str
    question: str
    options: list[str] | None = None
    problem_type: ProblemType
    solution: str
    think: str
    video_path: str
    skill: str
    subject: str
    discipline: str
    knowledge_point: str | None = None
    video_id: str
    models: dict[str, list[str]]
    verdicts: list[Verdict]

    @field_validator("solution", "think")
    @classmethod
    def _not_empty(cls, value: str) -> str:
        inner = re.sub(r"^<(think|answer)>|</(think|answer)>$", "", value).strip()
        if not inner:
            raise ValueError("empty trace or answer: the SFT loader would drop it")
        return value


class VideoRecord(Strict):
    """Everything one video produced, in the run directory's ``records/<video_id>.json``.

    ``unfinished`` is written when a video starts and stays until every planned (skill,
    round) has an outcome: a run stopped in between leaves it unfinished, never ``done``
    with rounds missing.
    """

    video_id: str
    video: Video
    status: Literal["done", "failed", "unfinished"]
    failure: str | None = None
    frames: int = 0
    generated: int = 0
    # The rounds the run planned for this video, per skill (None in records of older runs).
    planned: dict[str, int] | None = None
    accepted: list[AcceptedExample] = Field(default_factory=list)
    rejected: list[Rejection] = Field(default_factory=list)

    def missing_rounds(self) -> dict[str, int]:
        """Planned rounds without an outcome (accepted or rejected), per skill."""
        if not self.planned or self.status == "failed":
            return {}
        have: dict[str, int] = {}
        for example in self.accepted:
            have[example.skill] = have.get(example.skill, 0) + 1
        for rejection in self.rejected:
            have[rejection.skill] = have.get(rejection.skill, 0) + 1
        missing = {skill: n - have.get(skill, 0) for skill, n in self.planned.items()}
        return {skill: n for skill, n in missing.items() if n > 0}

    @property
    def finished(self) -> bool:
        """Done with an outcome for every planned round, or failed: nothing more will come."""
        if self.status == "failed":
            return True
        return self.status == "done" and not self.missing_rounds()


class CallRecord(Strict):
    """One model call: what it cost and how it ended."""

    step: str
    model: str
    video_id: str | None = None
    cache_key: str
    latency_s: float
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    cache_hit: bool
    attempts: int = 1
    outcome: Literal["ok", "malformed", "refusal", "error"]
    error: str | None = None
    # The model the router picked first for this instance, when it was cooled down and this
    # call went to another eligible model instead.
    rerouted_from: str | None = None
    # The request carried the step's JSON schema (the model's pool entry has
    # structured_output: true): why a model's malformed replies may have dropped.
    structured_output: bool = False


Candidate.model_rebuild()


# ---------------------------------------------------------------- corpus split


_ANSWER_TAGS = re.compile(r"^<answer>|</answer>$")


class RLExample(Strict):
    """An example as the RL file carries it: the question and its verifiable answer, no trace."""

    problem_id: str
    question: str
    options: list[str] | None = None
    problem_type: ProblemType
    solution: str
    video_path: str
    skill: str
    subject: str
    discipline: str
    video_id: str

    @field_validator("solution")
    @classmethod
    def _answer_not_empty(cls, value: str) -> str:
        if not _ANSWER_TAGS.sub("", value).strip():
            raise ValueError("empty answer: a verifiable reward needs one")
        return value


class SplitSide(Strict):
    """One side of a split (SFT or RL): its size and its videos."""

    examples: int
    videos: int
    by_skill: dict[str, int]
    by_problem_type: dict[str, int]
    video_ids: list[str]


class SplitManifest(Strict):
    """What ``vkr split`` decided, written to split.json beside sft.jsonl and rl.jsonl."""

    seed: int
    sft_share_requested: float
    sft_share: float
    run_dirs: list[str]
    sft: SplitSide
    rl: SplitSide
    # RL problem ids whose open-ended answer has fewer than two words ROUGE can score: even a
    # perfect response earns accuracy 2/3 (one word: no bigram for ROUGE-2) or 0 (none).
    open_ended_below_full_reward: list[str] = Field(default_factory=list)
    # Videos left out because their run had not finished them (--exclude-unfinished).
    excluded_unfinished: list[str] = Field(default_factory=list)


# ---------------------------------------------------------------- evaluation sets

EvalProblemType = Literal["multiple-choice", "open-ended"]
_EVAL_LETTER = re.compile(r"^\(?([A-J])(?:[\).:\s]|$)")


class EvalQuestion(BaseModel):
    """One question of an evaluation set (VideoKR-Eval style jsonl)."""

    # Eval files carry fields of their own (skill, discipline, benchmark ids); they are kept
    # and written back unchanged, so an extra field is data, not an error.
    model_config = ConfigDict(extra="allow")

    id: str = Field(min_length=1)
    video_path: str = Field(min_length=1)
    question: str = Field(min_length=1)
    options: list[str] | None = None
    problem_type: EvalProblemType
    solution: str = Field(min_length=1)
    dataset: str = Field(min_length=1, description="source benchmark")
    subject: str = ""

    @field_validator("id", mode="before")
    @classmethod
    def _numeric_id(cls, value: Any) -> Any:
        # Some benchmarks number their questions; an integer id is still an id.
        return str(value) if isinstance(value, int) and not isinstance(value, bool) else value

    @field_validator("problem_type", mode="before")
    @classmethod
    def _training_spelling(cls, value: Any) -> Any:
        return "multiple-choice" if value == "multiple choice" else value

    @property
    def answer(self) -> str:
        """The solution without its ``<answer>`` tags."""
        return _ANSWER_TAGS.sub("", self.solution.strip()).strip()

    @property
    def training_problem_type(self) -> ProblemType:
        """The type as training files and :func:`vkr_core.answers.answers_match` spell it."""
        return "multiple choice" if self.problem_type == "multiple-choice" else "open-ended"

    @model_validator(mode="after")
    def _answer_fits_type(self) -> EvalQuestion:
        if not self.answer:
            raise ValueError("solution is empty")
        if self.problem_type == "multiple-choice":
            if not self.options or len(self.options) < 2:
                raise ValueError("a multiple-choice question needs at least two options")
            if len(self.options) > len(OPTION_LETTERS):
                raise ValueError(f"at most {len(OPTION_LETTERS)} options, got {len(self.options)}")
            letters = OPTION_LETTERS[: len(self.options)]
            match = _EVAL_LETTER.match(self.answer)
            if not match or match.group(1) not in letters:
                raise ValueError(
                    f"solution {self.solution!r} is not one of the option letters {letters}"
                )
        elif self.options:
            raise ValueError("an open-ended question has no options")
        return self


class EquivalenceJudgement(Strict):
    """What an equivalence judge returns: does a given answer mean the reference answer?"""

    same: bool
    reason: str = ""


class ProbeTrial(Strict):
    """One single-frame trial: the frame shown, the answer given and whether it was right.

    ``outcome``: right / wrong (an answer was given); malformed / refusal (no usable answer,
    counts as wrong); failed (no reply after retries, or the judge could not decide: the
    trial is undetermined and a rerun tries it again).
    """

    trial: int
    frame_index: int
    frame_timestamp: float
    frame_clock: str
    answer: str | None = None
    outcome: Literal["right", "wrong", "malformed", "refusal", "failed"]
    correct: bool
    judged: bool = Field(default=False, description="an equivalence judge decided (open-ended)")
    note: str | None = None


class ModelProbe(Strict):
    """One model's trials on one evaluation question: a line of the probe's trials.jsonl."""

    id: str
    dataset: str
    problem_type: EvalProblemType
    video_path: str
    model: str
    solution: str
    trials: list[ProbeTrial]
    right: int
    # solvable: every trial right; not solvable: a trial was answered wrong; incomplete:
    # no trial was wrong but some could not be decided.
    status: Literal["solvable", "not solvable", "incomplete"]
    solvable: bool
