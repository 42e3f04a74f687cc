"""The per-video generation graph, compiled (see graphs.generation)."""

from __future__ import annotations

import random
from asyncio import sleep
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from langgraph.graph import END, START, StateGraph
from langgraph.runtime import Runtime
from langgraph.types import RetryPolicy, Send

from graphs.generation import (
    VideoState,
    _accepted,
    _rejection,
    decode_call,
    example_id,
    find_generator,
    planned_rounds,
    to_accepted,
)
from vkr_core.calls import CallFailed, ModelUnavailable
from vkr_core.context import RunContext, StepContext
from vkr_core.log import get_logger
from vkr_core.schemas import Candidate, Frame, Rejection, Video, VideoRecord, VkrError
from vkr_core.steps import Gate, ReplyError
from vkr_core.store import is_disk_full
from vkr_core.video import FrameSource

log = get_logger("vkr.graph")

# Transport failures are already retried per call; a node retry gives a model that was
# down a second chance. Malformed replies and refusals are outcomes, never retried here.
# A model cooled down by the run's health check makes its node fail fast so the router can
# send the instance elsewhere: that retry is free and immediate, and an outage may hit the
# replacement too, so it gets more attempts (the first matching policy applies).
NODE_RETRY = (
    RetryPolicy(max_attempts=5, initial_interval=0.0, jitter=False, retry_on=ModelUnavailable),
    RetryPolicy(max_attempts=2, initial_interval=1.0, retry_on=CallFailed),
)

Node = Callable[[dict[str, Any], Runtime[RunContext]], Awaitable[Any]]


@dataclass(frozen=True)
class Hop:
    """A round's next node and what it is given."""

    node: str
    payload: dict[str, Any]


def _retries_on(policy: RetryPolicy, exc: Exception) -> bool:
    # NODE_RETRY names exception classes; LangGraph also takes a tuple of them.
    retry_on = policy.retry_on
    classes = tuple(retry_on) if isinstance(retry_on, tuple | list) else (retry_on,)
    return isinstance(exc, tuple(c for c in classes if isinstance(c, type)))


async def retrying(node: Node, payload: dict[str, Any], runtime: Runtime[RunContext]) -> Any:
    """``node`` run under NODE_RETRY, with the rules LangGraph applies to a node's policies:
    the first policy whose ``retry_on`` matches decides; failed attempts are counted
    across policies; the wait grows by ``backoff_factor`` up to ``max_interval``, plus up
    to 1 s of jitter where the policy has it."""
    failures = 0
    while True:
        try:
            return await node(payload, runtime)
        except Exception as exc:
            policy = next((p for p in NODE_RETRY if _retries_on(p, exc)), None)
            failures += 1
            if policy is None or failures >= policy.max_attempts:
                raise
            interval = min(
                policy.max_interval,
                policy.initial_interval * policy.backoff_factor ** (failures - 1),
            )
            await sleep(interval + random.uniform(0, 1) if policy.jitter else interval)


def build_graph(registry: Any, checkpointer: Any, source: FrameSource) -> Any:
    """Compile the generation graph for the steps the plugins registered."""
    generator = find_generator(registry)
    gates: list[Gate] = registry.gates()

    async def frames_of(video: Video, run: RunContext) -> list[Frame]:
        # Every node asks; the frames are nearly always kept already, so the decode call
        # (paths, id check) is built only when it runs.
        return await source.get(video.video_id, lambda: decode_call(video, run)())

    gate_names = [g.name for g in gates]

    def next_hop(candidate: Candidate, index: int, payload: dict[str, Any]) -> Any:
        if index < len(gates):
            return Hop(
                gate_names[index], {**payload, "candidate": candidate.model_dump(), "gate": index}
            )
        return {"outcomes": [_accepted(candidate)]}

    async def prepare(state: VideoState, runtime: Runtime[RunContext]) -> dict[str, Any]:
        run = runtime.context
        video = Video.model_validate(state["video"])
        try:
            frames = await frames_of(video, run)
        except VkrError as exc:
            # A decoder that failed because the frames could not be written is not a bad video.
            if is_disk_full(exc) or run.store.low_on_space():
                raise run.store.disk_full_error(exc) from None
            return {
                "failure": str(exc),
                "frame_count": 0,
                "planned": planned_rounds(run.config, run.registry),
            }
        return {
            "frame_count": len(frames),
            "failure": None,
            "planned": planned_rounds(run.config, run.registry),
        }

    def fan_out(state: VideoState, runtime: Runtime[RunContext]) -> list[Send] | str:
        if state.get("failure") or not state.get("frame_count"):
            return "collect"
        sends = []
        for skill_name, rounds in state["planned"].items():
            for round_ in range(rounds):
                payload = {"video": state["video"], "skill": skill_name, "round": round_}
                sends.append(Send("round", payload))
        return sends

    async def step_context(payload: dict[str, Any], run: RunContext) -> StepContext:
        video = Video.model_validate(payload["video"])
        return StepContext(run, video, await frames_of(video, run))

    async def generate(payload: dict[str, Any], runtime: Runtime[RunContext]) -> Any:
        run = runtime.context
        ctx = await step_context(payload, run)
        skill = registry.get("skill", payload["skill"])
        round_ = payload["round"]
        try:
            candidate = await generator.generate(ctx, skill, round_)
        except ReplyError as exc:
            return {
                "outcomes": [
                    _rejection(
                        None,
                        example_id=example_id(ctx.video.video_id, skill.name, round_),
                        skill=skill.name,
                        round=round_,
                        step=generator.name,
                        reason=exc.reason,
                        kind=exc.kind,
                        raw=exc.raw,
                    )
                ]
            }
        return next_hop(candidate, 0, payload)

    def make_gate_node(gate: Gate, index: int) -> Any:
        async def run_gate(payload: dict[str, Any], runtime: Runtime[RunContext]) -> Any:
            ctx = await step_context(payload, runtime.context)
            candidate = Candidate.model_validate(payload["candidate"])
            base: dict[str, Any] = dict(
                example_id=candidate.example_id,
                skill=candidate.skill,
                round=candidate.round,
                step=gate.name,
            )
            try:
                verdict = await gate.check(ctx, candidate)
            except ReplyError as exc:
                return {
                    "outcomes": [
                        _rejection(candidate, **base, reason=exc.reason, kind=exc.kind, raw=exc.raw)
                    ]
                }
            candidate.verdicts.append(verdict)
            for model in verdict.models:
                candidate.models.setdefault(gate.name, []).append(model)
            if not verdict.passed:
                raw = "\n---\n".join(verdict.raw_replies) or None
                return {
                    "outcomes": [
                        _rejection(candidate, **base, reason=verdict.reason, kind="gate", raw=raw)
                    ]
                }
            if verdict.revised_reasoning:
                candidate.reasoning = verdict.revised_reasoning
            return next_hop(candidate, index + 1, payload)

        run_gate.__name__ = f"gate_{gate.name}"
        return run_gate

    async def collect(state: VideoState, runtime: Runtime[RunContext]) -> dict[str, Any]:
        run = runtime.context
        video = Video.model_validate(state["video"])
        planned = state.get("planned") or {}
        outcomes = state.get("outcomes") or []
        if not state.get("failure"):
            # LangGraph may run a deferred node at more than one superstep of a Send fan-out
            # (seen with 0, 5 and 6 of 6 outcomes): only the call that sees every planned
            # round writes the record, so a stopped run never leaves a partial one as done.
            have = {o["example_id"] for o in outcomes}
            if any(
                example_id(video.video_id, skill, r) not in have
                for skill, rounds in planned.items()
                for r in range(rounds)
            ):
                return {}
        record = VideoRecord(
            video_id=video.video_id,
            video=video,
            status="failed" if state.get("failure") else "done",
            failure=state.get("failure"),
            frames=state.get("frame_count") or 0,
            planned=planned,
        )
        for outcome in outcomes:
            if outcome["status"] == "accepted":
                record.accepted.append(
                    to_accepted(Candidate.model_validate(outcome["candidate"]), video, run)
                )
            else:
                record.rejected.append(Rejection.model_validate(outcome["rejection"]))
        record.generated = len(record.accepted) + sum(
            1 for r in record.rejected if r.step != generator.name
        )
        run.store.write_record(record)
        source.forget(video.video_id)
        if record.failure:
            run.store.add_failure(video.video_id, record.failure, video.path)
        return {"record": record.model_dump()}

    # One (skill, round): generate, then each gate in order, each node retried by
    # NODE_RETRY. A round is one node of the video's graph, its hops run here one after the
    # other: as nodes of a graph, LangGraph would run them in supersteps, so each hop of
    # every round would wait for the slowest of the video's rounds (12 calls at
    # video_dependency), and a graph per round costs ~8 % more CPU per call than this.
    # A round is not checkpointed inside: every reply it was paid for is in the call cache
    # (and the journal) before its node returns, so a round the run was stopped in runs
    # again from its start and pays for nothing twice; a finished round's outcome is in the
    # video's checkpoint.
    hops: dict[str, Node] = {gate.name: make_gate_node(gate, i) for i, gate in enumerate(gates)}

    async def round_(payload: dict[str, Any], runtime: Runtime[RunContext]) -> Any:
        result = await retrying(generate, payload, runtime)
        while isinstance(result, Hop):
            result = await retrying(hops[result.node], result.payload, runtime)
        return result

    graph = StateGraph(VideoState, context_schema=RunContext)
    graph.add_node("prepare", prepare)
    graph.add_node("round", round_)  # type: ignore[call-overload]  # Send payloads are plain dicts
    graph.add_node("collect", collect, defer=True)
    graph.add_edge(START, "prepare")
    graph.add_conditional_edges("prepare", fan_out, ["round", "collect"])
    graph.add_edge("round", "collect")
    graph.add_edge("collect", END)
    return graph.compile(checkpointer=checkpointer)
