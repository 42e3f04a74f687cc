"""A built bank: what ``vkr bank build`` writes beside its run files, and what show/stats read.

``DIR/bank.json`` (:class:`BuiltBank`) holds every lecture of the bank with its status and
knowledge points; ``DIR/knowledge_points.jsonl`` holds the points alone, one a line, for the
steps that come next (scenarios, keywords). Both are rewritten whole (atomically) at the end
of each build from the records, so they always match the bank file that was built.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError

from knowledge.loader import Bank, load_bank
from knowledge.pipeline import LectureRecord
from knowledge.schemas import KnowledgePoint, Lecture, slug
from vkr_core.errors import describe_validation_error
from vkr_core.files import atomic_write, read_jsonl
from vkr_core.schemas import InputError, Strict
from vkr_core.store import RunLayout, log_problem

BANK_FILE = "bank.json"
POINTS_FILE = "knowledge_points.jsonl"


class BuiltLecture(Strict):
    lecture: Lecture
    status: Literal["done", "failed", "unfinished"]
    failure: str | None = None
    model: str | None = None
    raw_reply: str | None = None
    points: list[KnowledgePoint] = Field(default_factory=list)


class BuiltBank(Strict):
    """Every lecture of the bank file that was built, in the file's order."""

    source: str
    lectures: list[BuiltLecture]

    def points(self) -> list[KnowledgePoint]:
        return [p for built in self.lectures for p in built.points]


@dataclass
class BuildResult:
    bank: BuiltBank
    counters: Any
    paths: list[Path] = field(default_factory=list)

    @property
    def failed(self) -> list[BuiltLecture]:
        return [b for b in self.bank.lectures if b.status != "done"]


def build_bank(
    bank_path: str | Path,
    pool: str | Path,
    out: str | Path,
    *,
    concurrency: int = 4,
    progress: bool = False,
    pm: Any = None,
    force: bool = False,
) -> BuildResult:
    """Run ``knowledge_points`` over every lecture of the bank into ``out`` (a run directory),
    then write the built bank there. A second build of the same bank pays for nothing."""
    from vkr_core.config import RunConfig
    from vkr_core.run import run_items

    bank = load_bank(bank_path)  # a bad bank stops here, before the run directory exists
    counters = asyncio.run(
        run_items(
            bank.lectures,
            out,
            pool,
            RunConfig(pipeline="bank"),
            pm,
            force,
            concurrency=concurrency,
            progress=progress,
        )
    )
    built = assemble(bank, out)
    return BuildResult(built, counters, write_built_bank(built, out))


def assemble(bank: Bank, out: str | Path) -> BuiltBank:
    """The built bank from the run directory's records (a lecture without one failed outside
    the pipeline, as failures.jsonl says, or was not reached)."""
    layout = RunLayout(out)
    failures: dict[str, str] = {}
    for _, line in read_jsonl(layout.failures, on_problem=log_problem, missing_ok=True):
        failures[str(line.get("video_id"))] = str(line.get("reason"))
    lectures = []
    for lecture in bank.lectures:
        path = layout.record(lecture.lecture_id)
        record = None
        if path.is_file():
            record = LectureRecord.model_validate_json(path.read_text(encoding="utf-8"))
        # The record must be of this very lecture: an expert may have edited its objectives.
        if record is not None and record.lecture.model_dump() == lecture.model_dump():
            lectures.append(
                BuiltLecture(
                    lecture=lecture,
                    status=record.status,
                    failure=record.failure,
                    model=record.model,
                    raw_reply=record.raw_reply,
                    points=record.points,
                )
            )
        elif lecture.lecture_id in failures:
            lectures.append(
                BuiltLecture(lecture=lecture, status="failed", failure=failures[lecture.lecture_id])
            )
        else:
            lectures.append(BuiltLecture(lecture=lecture, status="unfinished"))
    return BuiltBank(source=bank.source, lectures=lectures)


def write_built_bank(bank: BuiltBank, out: str | Path) -> list[Path]:
    root = Path(out)
    points = "".join(p.model_dump_json() + "\n" for p in bank.points())
    return [
        atomic_write(root / BANK_FILE, bank.model_dump_json(indent=2) + "\n"),
        atomic_write(root / POINTS_FILE, points),
    ]


def load_built_bank(directory: str | Path) -> BuiltBank:
    path = Path(directory) / BANK_FILE
    if not path.is_file():
        raise InputError(f"{directory} holds no built bank ({BANK_FILE}): run `vkr bank build`")
    try:
        return BuiltBank.model_validate_json(path.read_text(encoding="utf-8"))
    except ValidationError as exc:
        raise InputError(f"{path}: {describe_validation_error(exc)}") from None


# ---------------------------------------------------------------- show and stats


def select_subject(bank: BuiltBank, subject: str | None) -> list[BuiltLecture]:
    """The lectures of one subject (by name or slug, any case), or all of them."""
    if subject is None:
        return list(bank.lectures)
    wanted = slug(subject)
    chosen = [b for b in bank.lectures if slug(b.lecture.subject) == wanted]
    if not chosen:
        names = sorted({b.lecture.subject for b in bank.lectures})
        raise InputError(f"no subject {subject!r} in the bank (it has: {', '.join(names)})")
    return chosen


def show_lines(bank: BuiltBank, subject: str | None = None) -> list[str]:
    """The bank as an indented outline: discipline / subject, course, lecture, points."""
    lines: list[str] = []
    heading = course = None
    for built in select_subject(bank, subject):
        lecture = built.lecture
        if (lecture.discipline, lecture.subject) != heading:
            heading = (lecture.discipline, lecture.subject)
            course = None
            lines.append(f"{lecture.discipline} / {lecture.subject}")
        if lecture.course != course:
            course = lecture.course
            lines.append(f"  {course}")
        state = (
            f"{len(built.points)} point(s)"
            if built.status == "done"
            else f"{built.status.upper()}: {built.failure or 'not built yet'}"
        )
        lines.append(f"    {lecture.title}  [{lecture.lecture_id}]  {state}")
        for point in built.points:
            lines.append(f"      - {point.term}  [{point.point_id}]")
            lines.append(f"        {' '.join(point.definition.split())}")
    return lines


@dataclass
class Tally:
    lectures: int = 0
    built: int = 0
    failed: int = 0
    unfinished: int = 0
    points: int = 0

    def add(self, built: BuiltLecture) -> None:
        self.lectures += 1
        self.points += len(built.points)
        if built.status == "done":
            self.built += 1
        elif built.status == "failed":
            self.failed += 1
        else:
            self.unfinished += 1


def bank_stats(bank: BuiltBank) -> dict[str, Any]:
    """Counts per discipline, subject and course; points per built lecture; the failures."""
    levels: dict[str, dict[tuple[str, ...], Tally]] = {
        "discipline": defaultdict(Tally),
        "subject": defaultdict(Tally),
        "course": defaultdict(Tally),
    }
    total = Tally()
    for built in bank.lectures:
        lecture = built.lecture
        total.add(built)
        levels["discipline"][(lecture.discipline,)].add(built)
        levels["subject"][(lecture.discipline, lecture.subject)].add(built)
        levels["course"][(lecture.discipline, lecture.subject, lecture.course)].add(built)
    per_lecture = [len(b.points) for b in bank.lectures if b.status == "done"]
    return {
        "levels": {name: dict(sorted(rows.items())) for name, rows in levels.items()},
        "total": total,
        "points_per_lecture": {
            "min": min(per_lecture, default=0),
            "mean": sum(per_lecture) / len(per_lecture) if per_lecture else 0.0,
            "max": max(per_lecture, default=0),
        },
        "not_built": [
            (b.lecture.lecture_id, b.status, b.failure or "not built yet")
            for b in bank.lectures
            if b.status != "done"
        ],
    }


def stats_lines(bank: BuiltBank) -> list[str]:
    stats = bank_stats(bank)
    header = f"{'':60} {'lectures':>8} {'built':>6} {'failed':>6} {'points':>6}"
    lines = [header]

    def row(label: str, tally: Tally) -> str:
        return (
            f"{label[:60]:60} {tally.lectures:>8} {tally.built:>6} {tally.failed:>6} "
            f"{tally.points:>6}"
        )

    for name, rows in stats["levels"].items():
        lines.append(f"by {name}")
        for key, tally in rows.items():
            lines.append(row("  " + " / ".join(key), tally))
    lines.append(row("total", stats["total"]))
    spread = stats["points_per_lecture"]
    lines.append(
        f"points per built lecture: min {spread['min']}, mean {spread['mean']:.1f}, "
        f"max {spread['max']}"
    )
    if stats["not_built"]:
        lines.append(f"lectures not built ({len(stats['not_built'])}):")
        for lecture_id, status, why in stats["not_built"]:
            lines.append(f"  {lecture_id}  {status}: {why}")
    return lines
