"""Reading a knowledge bank: YAML (nested, as experts write it) or jsonl (a lecture a line).

Every problem is one line naming the file and the line an expert would open it at: a YAML
syntax error, a missing field, a wrong type, two lectures (or a subject under two
disciplines) that come to the same id.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from knowledge.schemas import BankFile, Lecture, LectureLine, lecture_id, slug
from vkr_core.errors import describe_validation_error
from vkr_core.files import read_jsonl
from vkr_core.schemas import InputError, Strict


@dataclass
class Bank:
    """The lectures of a bank file, in the order the file lists them."""

    source: str
    lectures: list[Lecture]

    def disciplines(self) -> list[str]:
        return sorted({lecture.discipline for lecture in self.lectures})

    def subjects(self) -> list[str]:
        return sorted({lecture.subject for lecture in self.lectures})


def load_bank(path: str | Path) -> Bank:
    """The bank in ``path`` (``.yaml``/``.yml`` or ``.jsonl``), or one InputError line."""
    file = Path(path)
    if not file.is_file():
        raise InputError(f"bank file not found: {file}")
    if file.suffix.lower() == ".jsonl":
        lectures = _jsonl_lectures(file)
    elif file.suffix.lower() in (".yaml", ".yml"):
        lectures = _yaml_lectures(file)
    else:
        raise InputError(f"{file}: a bank is a .yaml, .yml or .jsonl file")
    _check_unique(file, lectures)
    return Bank(str(file), lectures)


def _jsonl_lectures(file: Path) -> list[Lecture]:
    lectures = []
    for number, line in read_jsonl(file, LectureLine):
        lectures.append(
            Lecture(
                lecture_id=lecture_id(line.subject, line.course, line.title),
                discipline=line.discipline,
                subject=line.subject,
                course=line.course,
                title=line.title,
                objectives=line.objectives,
                line=number,
            )
        )
    if not lectures:
        raise InputError(f"{file}: the bank has no lectures")
    return lectures


def _yaml_lectures(file: Path) -> list[Lecture]:
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise InputError(f"{file}: not UTF-8 text") from None
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f":{mark.line + 1}" if mark else ""
        why = exc.problem or exc.context or "syntax error"
        if exc.problem and exc.context and exc.context_mark:
            # An unclosed bracket is found where the file ends: say where it was opened.
            why += f"; {exc.context} at line {exc.context_mark.line + 1}"
        raise InputError(f"{file}{where}: not valid YAML ({why})") from None
    except yaml.YAMLError as exc:
        raise InputError(f"{file}: not valid YAML ({type(exc).__name__})") from None
    try:
        bank = BankFile.model_validate(data if data is not None else {})
    except ValidationError as exc:
        first = exc.errors()[0]["loc"]
        raise InputError(
            f"{file}:{_line_of(root, first)}: {describe_validation_error(exc)}"
        ) from None
    lectures = []
    for s, subject in enumerate(bank.subjects):
        for c, course in enumerate(subject.courses):
            for n, entry in enumerate(course.lectures):
                location = ("subjects", s, "courses", c, "lectures", n)
                lectures.append(
                    Lecture(
                        lecture_id=lecture_id(subject.name, course.title, entry.title),
                        discipline=subject.discipline,
                        subject=subject.name,
                        course=course.title,
                        title=entry.title,
                        objectives=entry.objectives,
                        line=_line_of(root, location),
                    )
                )
    return lectures


def _line_of(root: yaml.Node | None, location: tuple[Any, ...]) -> int:
    """The line of the deepest YAML node on a pydantic error's path (1 when there is none)."""
    node = root
    line = node.start_mark.line + 1 if node is not None else 1
    for part in location:
        if isinstance(node, yaml.MappingNode):
            found = [value for key, value in node.value if key.value == part]
            if not found:
                break
            node = found[0]
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int):
            if part >= len(node.value):
                break
            node = node.value[part]
        else:
            break
        line = node.start_mark.line + 1
    return line


def _check_unique(file: Path, lectures: list[Lecture]) -> None:
    first: dict[str, Lecture] = {}
    disciplines: dict[str, Lecture] = {}
    for lecture in lectures:
        seen = first.setdefault(lecture.lecture_id, lecture)
        if seen is not lecture:
            raise InputError(
                f"{file}:{lecture.line}: lecture id {lecture.lecture_id!r} repeats the one at "
                f"line {seen.line} (same subject, course and title once case and punctuation "
                "are set aside): rename one"
            )
        other = disciplines.setdefault(slug(lecture.subject), lecture)
        if other.discipline != lecture.discipline:
            raise InputError(
                f"{file}:{lecture.line}: subject {lecture.subject!r} is under discipline "
                f"{lecture.discipline!r} here but under {other.discipline!r} at line "
                f"{other.line}: a subject belongs to one discipline"
            )


# ---------------------------------------------------------------- shipped data


class DisciplineEntry(Strict):
    name: str
    subjects: list[str]


class Taxonomy(Strict):
    """The disciplines and their subjects (``knowledge/data/disciplines.yaml``)."""

    disciplines: list[DisciplineEntry]

    def subjects(self) -> dict[str, str]:
        """Subject -> its discipline."""
        return {s: d.name for d in self.disciplines for s in d.subjects}


def data_path(name: str) -> Path:
    """A file shipped in ``knowledge/data``."""
    return Path(str(resources.files("knowledge") / "data" / name))


def example_bank_path() -> Path:
    """The worked example bank (2 subjects) that tests and the demo build."""
    return data_path("example_bank.yaml")


def load_taxonomy(path: str | Path | None = None) -> Taxonomy:
    """The shipped disciplines and subjects (or another taxonomy file)."""
    file = Path(path) if path is not None else data_path("disciplines.yaml")
    try:
        data = yaml.safe_load(file.read_text(encoding="utf-8"))
        taxonomy = Taxonomy.model_validate(data)
    except ValidationError as exc:
        raise InputError(f"{file}: {describe_validation_error(exc)}") from None
    except (OSError, yaml.YAMLError) as exc:
        raise InputError(f"{file}: cannot read the taxonomy ({type(exc).__name__})") from None
    subjects = [s for d in taxonomy.disciplines for s in d.subjects]
    repeated = sorted({s for s in subjects if subjects.count(s) > 1})
    if repeated:
        raise InputError(f"{file}: subject(s) listed twice: {', '.join(repeated)}")
    return taxonomy
