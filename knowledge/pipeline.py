"""The ``bank`` pipeline: ``knowledge_points`` over every lecture of a bank, through the engine.

Items are lectures (their id is the thread and record name); the engine gives the routing,
cache, retries, call records and resume. A reply that does not parse is the lecture's
recorded rejection, raw text kept; a rerun replays it from the cache and pays nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from knowledge.loader import load_bank
from knowledge.schemas import KnowledgePoint, Lecture, PointDrafts, point_id
from vkr_core.context import RunContext, StepContext
from vkr_core.hookspecs import hookimpl
from vkr_core.pipelines import Items, Pipeline, PipelineRun
from vkr_core.schemas import Strict
from vkr_core.steps import ReplyError

KNOWLEDGE_POINTS = "knowledge_points"


class LectureRecord(Strict):
    """What building one lecture produced, in ``records/<lecture_id>.json``."""

    item_id: str
    status: Literal["done", "failed", "unfinished"]
    failure: str | None = None
    lecture: Lecture
    points: list[KnowledgePoint] = Field(default_factory=list)
    model: str | None = None
    # The reply a rejection was made of, for the expert who reads why.
    raw_reply: str | None = None
    accepted: int = 0


def points_of(lecture: Lecture, drafts: PointDrafts) -> list[KnowledgePoint]:
    """The drafts as knowledge points of ``lecture``, with their stable ids."""
    return [
        KnowledgePoint(
            point_id=point_id(lecture.lecture_id, draft.term),
            lecture_id=lecture.lecture_id,
            discipline=lecture.discipline,
            subject=lecture.subject,
            course=lecture.course,
            lecture=lecture.title,
            term=draft.term,
            definition=draft.definition,
        )
        for draft in drafts.points
    ]


class BankRun(PipelineRun):
    def __init__(self, context: RunContext):
        self.context = context
        self.step = context.registry.get("step", KNOWLEDGE_POINTS)

    async def process(self, item: Lecture) -> LectureRecord:
        ctx = StepContext(self.context, item_id=item.lecture_id)
        meta = {"discipline": item.discipline, "subject": item.subject, "course": item.course}
        try:
            reply = await ctx.call(self.step, item, meta=meta)
        except ReplyError as exc:
            record = LectureRecord(
                item_id=item.lecture_id,
                status="failed",
                failure=f"{exc.kind} reply: {exc.reason}",
                lecture=item,
                raw_reply=exc.raw,
            )
        else:
            points = points_of(item, reply.output)
            record = LectureRecord(
                item_id=item.lecture_id,
                status="done",
                lecture=item,
                points=points,
                model=reply.model,
                accepted=len(points),
            )
        self.context.store.write_record(record)
        return record


class BankPipeline(Pipeline):
    name = "bank"
    description = "lectures of a knowledge bank -> knowledge points (knowledge_points, text)"
    noun = "lecture"
    item_schema = Lecture
    id_field = "lecture_id"

    def model_steps(self, registry: Any) -> list[str]:
        return [KNOWLEDGE_POINTS]

    def read_items(self, path: str | Path, config: Any) -> Items:
        """A bank file (YAML or jsonl): any problem in it stops the build before it starts."""
        bank = load_bank(path)
        return Items(source=bank.source, items=bank.lectures)

    async def open(self, context: RunContext, checkpointer: Any) -> BankRun:
        return BankRun(context)

    def failed(self, item: Any, reason: str) -> LectureRecord:
        return LectureRecord(item_id=item.lecture_id, status="failed", failure=reason, lecture=item)

    def summary(self, run_dir: Path, counters: Any) -> str:
        return (
            f"bank: {counters.done} lecture(s) built, {counters.failed} failed, "
            f"{counters.accepted} knowledge point(s)"
        )


@hookimpl
def vkr_register_pipelines(register: Any) -> None:
    register(BankPipeline())
