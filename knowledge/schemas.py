"""The knowledge bank's models and the inputs and outputs of its text steps.

Ids are derived, never written by hand: a lecture's from its path (subject / course /
lecture title), a knowledge point's from its lecture's id and its normalised term, so
rebuilding a bank, or asking another model, never renames what downstream data points to.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from typing import Annotated

from pydantic import Field, StringConstraints, field_validator, model_validator

from vkr_core.schemas import Strict

# ---------------------------------------------------------------- ids

# Each part of a lecture id is cut to fit: the whole id must stay a safe item id (a record
# file name and a checkpoint thread), which vkr caps at 128 characters.
_PART_CHARS = {"subject": 30, "course": 40, "lecture": 50}
_NOT_SLUG = re.compile(r"[^a-z0-9]+")
_SPACES = re.compile(r"\s+")


def normalise_term(text: str) -> str:
    """A term as two experts would agree it is the same: case, width, spacing and trailing
    punctuation do not count."""
    folded = unicodedata.normalize("NFKC", text).casefold()
    return _SPACES.sub(" ", folded).strip().strip(".,;:!?")


def _short_hash(text: str, length: int = 8) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:length]


def slug(text: str, limit: int = 60) -> str:
    """``text`` as lower-case ASCII letters and digits joined by '-', at most ``limit`` long.

    A text with no Latin letters or digits (a title in Chinese) or one cut to fit gets a short
    hash of the whole text, so two such titles never share a slug.
    """
    plain = unicodedata.normalize("NFKD", normalise_term(text)).encode("ascii", "ignore").decode()
    out = _NOT_SLUG.sub("-", plain).strip("-")
    if out and len(out) <= limit:
        return out
    digest = _short_hash(normalise_term(text), 8)
    if not out:
        return f"x-{digest}"
    return f"{out[: limit - len(digest) - 1].rstrip('-')}-{digest}"


def lecture_id(subject: str, course: str, title: str) -> str:
    """``subject.course.lecture``, each part a slug: stable as long as the path is."""
    return ".".join(
        (
            slug(subject, _PART_CHARS["subject"]),
            slug(course, _PART_CHARS["course"]),
            slug(title, _PART_CHARS["lecture"]),
        )
    )


def point_id(lecture: str, term: str) -> str:
    """A knowledge point's id: its term's slug and a hash of (lecture id, normalised term).

    The slug keeps ids readable in files; the hash keeps two lectures' "Torque" apart.
    """
    digest = _short_hash(f"{lecture}|{normalise_term(term)}", 10)
    return f"{slug(term, 40)}-{digest}"


# ---------------------------------------------------------------- the bank, as experts write it

Text = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=500)]
Objective = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=2000)]


class LectureEntry(Strict):
    """A lecture in a YAML bank: a title and what a student should take from it."""

    title: Text
    objectives: list[Objective] = Field(default_factory=list, max_length=50)


class CourseEntry(Strict):
    title: Text
    lectures: list[LectureEntry] = Field(min_length=1)


class SubjectEntry(Strict):
    name: Text
    discipline: Text
    courses: list[CourseEntry] = Field(min_length=1)


class BankFile(Strict):
    """A YAML bank: ``subjects: [{name, discipline, courses: [{title, lectures: [...]}]}]``."""

    subjects: list[SubjectEntry] = Field(min_length=1)


class LectureLine(Strict):
    """One line of a jsonl bank: a lecture with its whole path."""

    discipline: Text
    subject: Text
    course: Text
    title: Text
    objectives: list[Objective] = Field(default_factory=list, max_length=50)


class Lecture(Strict):
    """A lecture with its path and id: one item of the ``bank`` pipeline and the input of
    ``knowledge_points``."""

    lecture_id: str
    discipline: str
    subject: str
    course: str
    title: str
    objectives: list[str] = Field(default_factory=list)
    # Where the expert wrote it, for error messages ("bank.yaml:12").
    line: int | None = Field(default=None, exclude=True)

    @model_validator(mode="after")
    def _id_matches_path(self) -> Lecture:
        expected = lecture_id(self.subject, self.course, self.title)
        if self.lecture_id != expected:
            raise ValueError(
                f"lecture_id {self.lecture_id!r} is not the one its path gives ({expected!r})"
            )
        return self


# ---------------------------------------------------------------- knowledge points

Term = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=200)]
# A paragraph, not a gloss: the judges and the generator read it as the point's meaning.
Definition = Annotated[
    str, StringConstraints(strip_whitespace=True, min_length=40, max_length=3000)
]


class PointDraft(Strict):
    """A knowledge point as the model writes it."""

    term: Term
    definition: Definition


def _no_repeats(values: list[str], what: str) -> None:
    seen: dict[str, str] = {}
    for value in values:
        key = normalise_term(value)
        if key in seen:
            raise ValueError(f"{what} {value!r} repeats {seen[key]!r}")
        seen[key] = value


class PointDrafts(Strict):
    """What ``knowledge_points`` must return: 1-12 points, each term once."""

    points: list[PointDraft] = Field(min_length=1, max_length=12)

    @model_validator(mode="after")
    def _distinct_terms(self) -> PointDrafts:
        _no_repeats([p.term for p in self.points], "term")
        return self


class KnowledgePoint(Strict):
    """A knowledge point of the built bank, with its stable id and its lecture's path.

    ``term``/``definition`` are the fields ``vkr_core.schemas.KnowledgePoint`` has, so a
    manifest line takes them as they are.
    """

    point_id: str
    lecture_id: str
    discipline: str
    subject: str
    course: str
    lecture: str
    term: str
    definition: str


# ---------------------------------------------------------------- scenarios and keywords

Scenario = Annotated[str, StringConstraints(strip_whitespace=True, min_length=20, max_length=1000)]
Keyword = Annotated[str, StringConstraints(strip_whitespace=True, min_length=2, max_length=100)]


class Scenarios(Strict):
    """What ``scenario_generation`` must return: 1-3 distinct real-world situations."""

    scenarios: list[Scenario] = Field(min_length=1, max_length=3)

    @model_validator(mode="after")
    def _distinct(self) -> Scenarios:
        _no_repeats(self.scenarios, "scenario")
        return self


class ScenarioInput(Strict):
    """What ``search_keywords`` works on: one scenario of one knowledge point."""

    point: KnowledgePoint
    scenario: Scenario


class SearchKeywords(Strict):
    """What ``search_keywords`` must return: 1-5 distinct YouTube search queries."""

    keywords: list[Keyword] = Field(min_length=1, max_length=5)

    @field_validator("keywords")
    @classmethod
    def _one_line(cls, value: list[str]) -> list[str]:
        for keyword in value:
            if "\n" in keyword or "\r" in keyword:
                raise ValueError(f"keyword {keyword!r} spans more than one line")
        return value

    @model_validator(mode="after")
    def _distinct(self) -> SearchKeywords:
        _no_repeats(self.keywords, "keyword")
        return self
