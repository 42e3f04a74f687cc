"""The collection pipeline's two relevance judges (DESIGN.md stages 5 and 7).

``metadata_relevance`` (text): a candidate's title, description, duration and channel, with
the knowledge point and the scenario it should show -> relevant or not, with a reason.
``visual_relevance`` (vision): frames of the downloaded video with their timestamps, with the
same knowledge point and scenario -> relevant or not, with a reason.

Everything the judges are shown as text is untrusted: titles and descriptions come from
YouTube, the knowledge point and scenario from models. Each is cut to a cap and fenced as
data. :func:`judge_metadata` and :func:`judge_frames` are what a pipeline calls: a reply
that does not parse, or a refusal, comes back as a recorded "not relevant" decision with
the raw text kept, never as a crash.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from vkr_core.context import StepContext, fence, with_untrusted_note
from vkr_core.hookspecs import hookimpl
from vkr_core.schemas import METADATA_CAPS, Frame, Strict, format_clock
from vkr_core.steps import Prompt, ReplyError, Step, StepReply

PROMPTS = Path(__file__).parent / "prompts"
METADATA_PROMPT = Prompt(PROMPTS / "metadata_relevance.txt", "v1")
VISUAL_PROMPT = Prompt(PROMPTS / "visual_relevance.txt", "v1")

# Every judge call pays for these fields; the caps are the manifest's own
# (vkr_core.schemas.METADATA_CAPS) where the field is the same, so a video's text reaches
# the judges and the generator alike.
CANDIDATE_CAPS = {
    "title": METADATA_CAPS["title"],
    "description": METADATA_CAPS["description"],
    # YouTube channel names are at most 100 characters; other sources get the title's room.
    "channel": METADATA_CAPS["title"],
}
KNOWLEDGE_CAPS = {
    "term": METADATA_CAPS["knowledge_point.term"],
    "definition": METADATA_CAPS["knowledge_point.definition"],
    # A scenario is one to three sentences (scenario_generation); a longer one is a
    # runaway reply, not a scenario.
    "scenario": 2_000,
}
# Frames the visual judge sees at most: enough to tell a lecture from the real scene,
# few enough that the call stays cheap.
VISUAL_FRAMES = 8


def _cap(model: Strict, caps: dict[str, int], truncated: dict[str, int]) -> None:
    """Cut each capped field of ``model`` to its cap, noting its length before the cut."""
    for name, cap in caps.items():
        value = getattr(model, name)
        if len(value) > cap:
            truncated[name] = len(value)
            setattr(model, name, value[:cap])


# ---------------------------------------------------------------- inputs and outputs


class KnowledgeContext(Strict):
    """What a video must embody: a knowledge point (term + definition) and one scenario.

    Minimal on purpose: the knowledge bank's own schemas map onto it.
    """

    term: str = Field(min_length=1)
    definition: str = ""
    scenario: str = ""
    # The point's place in the bank: not shown to the judge, but a pilot of the judge
    # samples each discipline from them (MetadataRelevance.strata).
    discipline: str = ""
    subject: str = ""
    # Fields cut to KNOWLEDGE_CAPS: field -> its length before the cut.
    truncated: dict[str, int] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _capped(self) -> KnowledgeContext:
        _cap(self, KNOWLEDGE_CAPS, self.truncated)
        return self

    def key(self) -> str:
        """A short digest naming this (point, scenario): one video is judged per pair."""
        blob = json.dumps([self.term, self.definition, self.scenario], ensure_ascii=False)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


class CandidateVideo(Strict):
    """A search result before download: what the video site says about it."""

    video_id: str = Field(min_length=1)
    title: str = ""
    description: str = ""
    duration_s: float | None = Field(default=None, ge=0)
    channel: str = ""
    url: str = ""
    # Fields cut to CANDIDATE_CAPS: field -> its length before the cut.
    truncated: dict[str, int] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _capped(self) -> CandidateVideo:
        _cap(self, CANDIDATE_CAPS, self.truncated)
        return self


class MetadataQuestion(Strict):
    """What metadata_relevance works on: one candidate against one (point, scenario)."""

    candidate: CandidateVideo
    knowledge: KnowledgeContext


class VisualQuestion(Strict):
    """What visual_relevance works on: the item's frames against one (point, scenario)."""

    knowledge: KnowledgeContext
    max_frames: int = Field(default=VISUAL_FRAMES, ge=1, le=64)


class RelevanceJudgement(Strict):
    """What both judges must return."""

    relevant: bool
    reason: str = Field(min_length=1)


class RelevanceDecision(Strict):
    """A judge's decision on one item, as a pipeline records it.

    ``outcome`` says whether a model's judgement decided (``ok``) or the reply was unusable
    (``malformed``, ``refusal``): then the item is not relevant and ``raw_reply`` keeps what
    the model said.
    """

    step: str
    item_id: str
    knowledge_key: str
    relevant: bool
    reason: str
    outcome: Literal["ok", "malformed", "refusal"]
    model: str | None = None
    raw_reply: str | None = None
    frames: list[float] = Field(default_factory=list)


# ---------------------------------------------------------------- prompt blocks


def knowledge_fences(knowledge: KnowledgeContext) -> list[str]:
    cut = knowledge.truncated
    blocks = [
        fence("knowledge point", knowledge.term, original_length=cut.get("term"), one_line=True)
    ]
    if knowledge.definition:
        blocks.append(
            fence(
                "knowledge point definition",
                knowledge.definition,
                original_length=cut.get("definition"),
            )
        )
    if knowledge.scenario:
        blocks.append(fence("scenario", knowledge.scenario, original_length=cut.get("scenario")))
    return blocks


def candidate_fences(candidate: CandidateVideo) -> list[str]:
    cut = candidate.truncated
    title = candidate.title or "(no title)"
    blocks = [fence("video title", title, original_length=cut.get("title"), one_line=True)]
    if candidate.description:
        blocks.append(
            fence(
                "video description",
                candidate.description,
                original_length=cut.get("description"),
            )
        )
    if candidate.channel:
        blocks.append(
            fence("channel", candidate.channel, original_length=cut.get("channel"), one_line=True)
        )
    return blocks


def evenly_spaced(frames: list[Frame], k: int) -> list[Frame]:
    """At most ``k`` frames spread over the whole video, first and last included."""
    if len(frames) <= k:
        return list(frames)
    if k == 1:
        return [frames[len(frames) // 2]]
    step = (len(frames) - 1) / (k - 1)
    return [frames[round(i * step)] for i in range(k)]


# ---------------------------------------------------------------- the steps


class MetadataRelevance(Step[MetadataQuestion, RelevanceJudgement]):
    name = "metadata_relevance"
    modality = "text"
    prompt = METADATA_PROMPT
    output_schema = RelevanceJudgement
    max_tokens = 256

    def format_input(
        self, inp: MetadataQuestion, ctx: StepContext | None = None
    ) -> list[dict[str, Any]]:
        candidate = inp.candidate
        duration = (
            format_clock(candidate.duration_s) if candidate.duration_s is not None else "unknown"
        )
        text = (
            "The knowledge point and the scenario the video should show:\n"
            + "\n".join(knowledge_fences(inp.knowledge))
            + "\n\nThe candidate video, as the video site describes it:\n"
            + "\n".join(candidate_fences(candidate))
            + f"\nDuration (mm:ss): {duration}"
            + "\n\nIs this video relevant? Reply as JSON."
        )
        return with_untrusted_note(METADATA_PROMPT.render(), text)

    def strata(self, inp: MetadataQuestion) -> dict[str, str]:
        # A candidate has no discipline of its own: it is the point's it was found for.
        return {"discipline": inp.knowledge.discipline, "subject": inp.knowledge.subject}

    async def judge(
        self, ctx: StepContext, *, candidate: dict[str, Any], knowledge: dict[str, Any]
    ) -> RelevanceDecision:
        """judge_metadata from plain fields (CandidateVideo's and KnowledgeContext's), so a
        pipeline reaches the judge through the registry without this module's schemas."""
        return await judge_metadata(ctx, CandidateVideo(**candidate), KnowledgeContext(**knowledge))


class VisualRelevance(Step[VisualQuestion, RelevanceJudgement]):
    name = "visual_relevance"
    modality = "vision"
    prompt = VISUAL_PROMPT
    output_schema = RelevanceJudgement
    max_tokens = 256

    def shown_frames(self, inp: VisualQuestion, ctx: StepContext) -> list[Frame]:
        return evenly_spaced(ctx.frames, inp.max_frames)

    def format_input(self, inp: VisualQuestion, ctx: StepContext) -> list[dict[str, Any]]:
        intro = (
            "The knowledge point and the scenario the video should show:\n"
            + "\n".join(knowledge_fences(inp.knowledge))
            + "\n\nFrames of the video:"
        )
        content: list[dict[str, Any]] = [{"type": "text", "text": intro}]
        content += ctx.frame_parts(self.shown_frames(inp, ctx))
        content.append({"type": "text", "text": "Is this video relevant? Reply as JSON."})
        return with_untrusted_note(VISUAL_PROMPT.render(), content)

    async def judge(
        self, ctx: StepContext, *, knowledge: dict[str, Any], max_frames: int = VISUAL_FRAMES
    ) -> RelevanceDecision:
        """judge_frames on the frames of ``ctx`` from KnowledgeContext's plain fields."""
        return await judge_frames(ctx, KnowledgeContext(**knowledge), max_frames)


METADATA_RELEVANCE = MetadataRelevance()
VISUAL_RELEVANCE = VisualRelevance()


# ---------------------------------------------------------------- what a pipeline calls


def _decision(
    step: str,
    ctx: StepContext,
    knowledge: KnowledgeContext,
    reply: StepReply[RelevanceJudgement] | ReplyError,
    frames: Sequence[Frame] = (),
) -> RelevanceDecision:
    shown = [frame.timestamp for frame in frames]
    if isinstance(reply, ReplyError):
        kind: Literal["malformed", "refusal"] = (
            "refusal" if reply.kind == "refusal" else "malformed"
        )
        return RelevanceDecision(
            step=step,
            item_id=ctx.item_id,
            knowledge_key=knowledge.key(),
            relevant=False,
            reason=f"{kind} reply: {reply.reason}",
            outcome=kind,
            raw_reply=reply.raw,
            frames=shown,
        )
    return RelevanceDecision(
        step=step,
        item_id=ctx.item_id,
        knowledge_key=knowledge.key(),
        relevant=reply.output.relevant,
        reason=reply.output.reason,
        outcome="ok",
        model=reply.model,
        raw_reply=reply.raw,
        frames=shown,
    )


async def judge_metadata(
    ctx: StepContext, candidate: CandidateVideo, knowledge: KnowledgeContext
) -> RelevanceDecision:
    """metadata_relevance on one candidate (``ctx`` is the candidate's item context).

    The model is the router's pick per (candidate, point, scenario); the call is cached and
    recorded by the engine. A call that gets no reply raises (CallFailed): it says nothing
    about the video, and a rerun asks again.
    """
    step = ctx.run_context.registry.get("step", MetadataRelevance.name)
    question = MetadataQuestion(candidate=candidate, knowledge=knowledge)
    meta = {"knowledge_key": knowledge.key(), "term": knowledge.term}
    try:
        reply = await ctx.call(step, question, knowledge.key(), meta=meta)
    except ReplyError as exc:
        return _decision(step.name, ctx, knowledge, exc)
    return _decision(step.name, ctx, knowledge, reply)


async def judge_frames(
    ctx: StepContext, knowledge: KnowledgeContext, max_frames: int = VISUAL_FRAMES
) -> RelevanceDecision:
    """visual_relevance on the video of ``ctx`` (its sampled frames), like judge_metadata."""
    step = ctx.run_context.registry.get("step", VisualRelevance.name)
    question = VisualQuestion(knowledge=knowledge, max_frames=max_frames)
    shown = step.shown_frames(question, ctx)
    meta = {"knowledge_key": knowledge.key(), "term": knowledge.term}
    try:
        reply = await ctx.call(step, question, knowledge.key(), meta=meta)
    except ReplyError as exc:
        return _decision(step.name, ctx, knowledge, exc, shown)
    return _decision(step.name, ctx, knowledge, reply, shown)


@hookimpl
def vkr_register_steps(register: Any) -> None:
    register(METADATA_RELEVANCE)
    register(VISUAL_RELEVANCE)
