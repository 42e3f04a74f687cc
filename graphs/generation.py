"""The per-video generation graph.

prepare (probe + sample frames) -> Send fan-out per (skill, round) -> round -> collect
(deferred until every round has ended). A round runs generate, then each gate in declared
order, one after the other inside its node, so a round whose reply is in goes on to its
next gate without waiting for the video's other rounds. Steps come from the plugin
registry; nothing here names a concrete one.

Checkpoints: the video's graph is checkpointed (thread = video id) after prepare and after
each round ends; a round is not. A run stopped inside a round runs that round again from
its start on resume, and every call the round had made is answered from the call cache
(or the journal), so nothing is paid for twice.
"""

from __future__ import annotations

import asyncio
import functools
import importlib
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Annotated, Any, Literal, TypedDict

from vkr_core.context import RunContext
from vkr_core.hookspecs import hookimpl
from vkr_core.log import get_logger
from vkr_core.pipelines import ItemProblem, Items, Pipeline, PipelineRun
from vkr_core.schemas import (
    AcceptedExample,
    Candidate,
    Frame,
    Rejection,
    Video,
    VideoRecord,
    VkrError,
)
from vkr_core.seeds import SeedBank
from vkr_core.steps import Gate, Generator
from vkr_core.video import FrameSource

log = get_logger("vkr.graph")

# Videos whose frame lists stay in memory (a few KB each): those in flight, and some more.
FRAME_CACHE_VIDEOS = 512
# Threads waiting on decoder processes: decoding is another process's CPU, so more threads
# than cores keep both cores busy while some wait on a slow file.
DECODE_WORKERS = 8


def example_id(video_id: str, skill: str, round: int) -> str:
    """The id of one (skill, round) of a video: its outcome's key and the problem_id."""
    return f"{video_id}-{skill}-{round}"


def merge_outcomes(left: list[dict[str, Any]], right: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Fan-in reducer: one outcome per example id, sorted so snapshots are stable."""
    merged = {o["example_id"]: o for o in left}
    merged.update({o["example_id"]: o for o in right})
    return [merged[k] for k in sorted(merged)]


class VideoState(TypedDict, total=False):
    video: dict[str, Any]
    # skill -> rounds, fixed when the video starts, so collect knows when every round is in.
    planned: dict[str, int]
    frame_count: int
    failure: str | None
    outcomes: Annotated[list[dict[str, Any]], merge_outcomes]
    record: dict[str, Any]


def _rejection(
    candidate: Candidate | None,
    *,
    example_id: str,
    skill: str,
    round: int,
    step: str,
    reason: str,
    kind: Literal["gate", "malformed", "refusal", "error"],
    raw: str | None,
) -> dict[str, Any]:
    rejection = Rejection(
        example_id=example_id,
        skill=skill,
        round=round,
        step=step,
        reason=reason,
        kind=kind,
        raw_reply=raw,
        candidate=candidate,  # type: ignore[arg-type]
    )
    return {"example_id": example_id, "status": "rejected", "rejection": rejection.model_dump()}


def _accepted(candidate: Candidate) -> dict[str, Any]:
    return {
        "example_id": candidate.example_id,
        "status": "accepted",
        "candidate": candidate.model_dump(),
    }


def find_generator(registry: Any) -> Generator:
    """The one registered step that writes candidates (a Generator)."""
    generators = [s for s in registry.steps.values() if isinstance(s, Generator)]
    if len(generators) != 1:
        names = ", ".join(sorted(g.name for g in generators)) or "none"
        raise VkrError(f"generation needs exactly one generator step; registered: {names}")
    return generators[0]


def run_skills(config: Any, registry: Any) -> list[str]:
    """The skills a run generates: ``--skills``, else every registered one."""
    return list(config.skills or sorted(registry.skills))


def planned_rounds(config: Any, registry: Any) -> dict[str, int]:
    """Rounds per skill every video gets: a video is done when each has an outcome."""
    return {
        name: config.rounds_per_skill or registry.get("skill", name).rounds
        for name in run_skills(config, registry)
    }


def decode_call(video: Video, run: RunContext) -> Callable[[], list[Frame]]:
    """Sampling a video's frames as the run is configured, for a FrameSource to run.

    Frames travel by reference: state and Send payloads carry the video, never its frame
    list (64 frames repeated in ~30 checkpoints per video were most of their size). After a
    resume the frames manifest sample_frames left in the run directory answers without
    decoding (under a millisecond).
    """
    from vkr_core.video import sample_frames

    config = run.config
    return functools.partial(
        sample_frames,
        video.path,
        run.store.frames_dir(video.video_id),
        fps=config.fps,
        max_frames=config.max_frames,
        max_side=config.max_side,
        jpeg_quality=config.jpeg_quality,
        timeout=config.decode_timeout,
        pm=run.pm,
    )


def to_accepted(candidate: Candidate, video: Video, run: RunContext) -> AcceptedExample:
    """An accepted candidate in the VideoKR release fields (FORMATS.md) plus provenance."""
    from vkr_core.sources import video_path_in_root

    answer = candidate.answer
    if candidate.problem_type == "multiple choice":
        from vkr_core.answers import option_letter

        answer = option_letter(answer) or answer
    kp = video.knowledge_point
    return AcceptedExample(
        problem_id=candidate.example_id,
        question=candidate.question,
        options=candidate.options if candidate.problem_type == "multiple choice" else None,
        problem_type=candidate.problem_type,
        solution=f"<answer>{answer}</answer>",
        think=f"<think>{candidate.reasoning.strip()}</think>",
        video_path=video.video_path or video_path_in_root(video.path, run.config.video_root),
        skill=candidate.skill,
        subject=video.subject,
        discipline=video.discipline,
        knowledge_point=kp.term if kp else None,
        video_id=video.video_id,
        models=candidate.models,
        verdicts=candidate.verdicts,
    )


async def process_video(
    graph: Any, video: Video, run: RunContext, retry_failed: bool = False
) -> VideoRecord:
    """Run (or resume, or replay) one video through the graph; thread id = video id.

    A finished video replays its record. One that failed (say, a file that did not decode)
    starts afresh with ``retry_failed``, e.g. after the file was replaced.
    """
    config = {"configurable": {"thread_id": video.video_id}}
    snapshot = await graph.aget_state(config)
    if snapshot.values.get("record") and not snapshot.next:
        record = VideoRecord.model_validate(snapshot.values["record"])
        if not (retry_failed and record.status == "failed"):
            return record
        await graph.checkpointer.adelete_thread(video.video_id)
        snapshot = await graph.aget_state(config)
    graph_input = None if snapshot.next else {"video": video.model_dump(), "outcomes": []}
    result = await graph.ainvoke(graph_input, config, context=run, durability="sync")
    if "record" not in result:
        planned = result.get("planned") or {}
        have = len(result.get("outcomes") or [])
        raise VkrError(
            f"video {video.video_id} ended with {sum(planned.values()) - have} of "
            f"{sum(planned.values())} rounds without an outcome"
        )
    return VideoRecord.model_validate(result["record"])


# ---------------------------------------------------------------- the pipeline


def funnel(records: Iterable[VideoRecord] | Any, gate_names: list[str]) -> list[tuple[str, int]]:
    """Examples left after each stage (the report's funnel, as (stage, count) pairs), from
    records or from the counts a run kept of them."""
    from corpus.report import funnels

    return [(row["stage"], row["count"]) for row in funnels(records, gate_names)["overall"]]


def format_funnel(rows: list[tuple[str, int]]) -> str:
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"  {name:<{width}}  {count:>5}" for name, count in rows)


class GenerationRun(PipelineRun):
    def __init__(self, context: RunContext, checkpointer: Any):
        self.context = context
        self.frames = FrameSource(workers=DECODE_WORKERS, keep=FRAME_CACHE_VIDEOS)
        # LangGraph (~0.8 s of imports) only where a graph is compiled: not at plugin load.
        from graphs.generation_graph import build_graph

        self.graph = build_graph(context.registry, checkpointer, self.frames)

    async def prepare(self, item: Video) -> None:
        if not self.context.store.record_path(item.video_id).exists():
            await self.frames.prefetch(item.video_id, decode_call(item, self.context))

    async def process(self, item: Video) -> VideoRecord:
        store = self.context.store
        if not store.record_path(item.video_id).exists():
            # Until its last round has an outcome the video is unfinished on disk, so a
            # run stopped in between is visible to split, export and the report.
            store.write_record(
                VideoRecord(
                    video_id=item.video_id,
                    video=item,
                    status="unfinished",
                    planned=planned_rounds(self.context.config, self.context.registry),
                )
            )
        return await process_video(
            self.graph, item, self.context, retry_failed=self.context.config.retry_failed
        )

    async def close(self) -> None:
        self.frames.close()


class GenerationPipeline(Pipeline):
    """Skill-oriented QA generation: per video, (skill x round) candidates through the gates."""

    name = "generation"
    description = "videos -> verified QA examples with chain-of-thought (the paper's stages 9-12)"
    noun = "video"
    item_schema = Video
    id_field = "video_id"

    def model_steps(self, registry: Any) -> list[str]:
        return [
            n
            for n, s in registry.steps.items()
            if isinstance(s, (Gate, Generator)) and s.uses_model
        ]

    def gate_order(self, registry: Any) -> list[str]:
        return [g.name for g in registry.gates()]

    def check(self, run: Any) -> None:
        find_generator(run.registry)
        skills = run_skills(run.config, run.registry)
        for skill in skills:
            run.registry.get("skill", skill)
        # Every skill needs seeds: its plugin's, or the --seed-bank's (which wins per skill).
        SeedBank.for_run(run.registry, skills, run.config.seed_bank)

    def read_items(self, path: str | Path, config: Any) -> Items:
        from vkr_core.manifest import load_manifest

        loaded = load_manifest(path, getattr(config, "video_root", None))
        problems = [ItemProblem(p.line, p.video_id, p.path, p.reason) for p in loaded.problems]
        return Items(
            source=loaded.source,
            items=list(loaded.videos),
            problems=problems,
            settings={"video_root": loaded.video_root},
        )

    async def open(self, context: RunContext, checkpointer: Any) -> GenerationRun:
        # LangGraph's import (~1 s) in a thread: the loop may already run other tasks.
        await asyncio.to_thread(importlib.import_module, "graphs.generation_graph")
        skills = run_skills(context.config, context.registry)
        context.seed_bank = SeedBank.for_run(context.registry, skills, context.config.seed_bank)
        return GenerationRun(context, checkpointer)

    def failed(self, item: Video, reason: str) -> VideoRecord:
        return VideoRecord(video_id=item.video_id, video=item, status="failed", failure=reason)

    def tally(self) -> Any:
        from corpus.report import FunnelCounts

        return FunnelCounts()

    def summary(self, run_dir: Path, counters: Any) -> str:
        from corpus.report import build_report, summary_text, write_report

        gates = saved_gate_order(run_dir)
        lines = [counters.line()]
        if counters.funnel is not None:
            # From the counts the run kept, not from its records: those are on disk only.
            lines.append(format_funnel(funnel(counters.funnel, gates)))
        # Every run leaves its report beside its records; `vkr report` rebuilds it any time.
        report = build_report(run_dir, gates)
        write_report(report, run_dir)
        lines.append(summary_text(report))
        return "\n".join(lines)


def saved_gate_order(run_dir: str | Path) -> list[str]:
    """The gate order the run saved in its config snapshot."""
    from vkr_core.store import RunLayout

    config = RunLayout(run_dir).read_config()
    return list((config or {}).get("gate_order") or [])


@hookimpl
def vkr_register_pipelines(register: Any) -> None:
    register(GenerationPipeline())
