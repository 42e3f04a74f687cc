"""The per-video generation graph, compiled (see graphs.generation)."""

from __future__ import annotations

import warnings
from typing import Any, cast

from langgraph.graph import END, START, StateGraph
from langgraph.runtime import Runtime
from langgraph.types import Command, RetryPolicy, Send

from graphs.generation import (
    RoundOutput,
    RoundState,
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

# A round's graph has no checkpointer and is invoked with durability "exit" (see round_),
# which LangGraph warns has no effect: that is the point. Only this warning is silenced.
warnings.filterwarnings(
    "ignore",
    message="`durability` has no effect when no checkpointer is present",
    category=UserWarning,
    module=r"langgraph\.pregel\.main",
)

# Transport failures are already retried per call; a node retry gives a model that was
# down a second chance. Malformed replies and refusals are outcomes, never retried here.
# A model cooled down by the run's health check makes its node fail fast so the router can
# send the instance elsewhere: that retry is free and immediate, and an outage may hit the
# replacement too, so it gets more attempts (the first matching policy applies).
NODE_RETRY = (
    RetryPolicy(max_attempts=5, initial_interval=0.0, jitter=False, retry_on=ModelUnavailable),
    RetryPolicy(max_attempts=2, initial_interval=1.0, retry_on=CallFailed),
)


def build_graph(registry: Any, checkpointer: Any, source: FrameSource) -> Any:
    """Compile the generation graph for the steps the plugins registered."""
    generator = find_generator(registry)
    gates: list[Gate] = registry.gates()

    async def frames_of(video: Video, run: RunContext) -> list[Frame]:
        # Every node asks; the frames are nearly always kept already, so the decode call
        # (paths, id check) is built only when it runs.
        return await source.get(video.video_id, lambda: decode_call(video, run)())

    gate_names = [g.name for g in gates]

    def next_hop(candidate: Candidate, index: int, payload: dict[str, Any]) -> Command:
        if index < len(gates):
            return Command(
                goto=Send(
                    gate_names[index],
                    {**payload, "candidate": candidate.model_dump(), "gate": index},
                )
            )
        return Command(update={"outcomes": [_accepted(candidate)]})

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

    # One (skill, round): generate, then each gate in order, as its own state machine. A
    # video's rounds run side by side as one superstep of the video's graph; inside a round
    # each hop starts when that round's last one ends, not when the slowest of the video's
    # rounds has (LangGraph runs a graph's nodes in supersteps).
    round_graph = StateGraph(RoundState, context_schema=RunContext, output_schema=RoundOutput)
    round_graph.add_node(  # type: ignore[call-overload]  # Send payloads are plain dicts
        "generate", generate, retry_policy=NODE_RETRY, destinations=tuple(gate_names) or None
    )
    for index, gate in enumerate(gates):
        round_graph.add_node(
            gate.name,
            make_gate_node(gate, index),
            retry_policy=NODE_RETRY,
            destinations=tuple(gate_names[index + 1 :]) or None,
        )
    round_graph.add_edge(START, "generate")
    # No checkpoints inside a round: every reply it was paid for is in the call cache (and
    # the journal) before its node returns, so a round the run was stopped in is run again
    # from its start and pays for nothing twice; a finished round's outcome is in the
    # video's checkpoint.
    rounds = round_graph.compile(checkpointer=False)

    async def round_(payload: dict[str, Any], runtime: Runtime[RunContext]) -> Any:
        # Durability named here: a round would inherit the video's "sync", and LangGraph
        # 1.2 then awaits a checkpoint that a graph without a checkpointer never writes
        # (AttributeError: '_put_checkpoint_fut'; zenml-io/kitaru#403 met the same).
        round_input = cast(RoundState, payload)
        return await rounds.ainvoke(round_input, context=runtime.context, durability="exit")

    graph = StateGraph(VideoState, context_schema=RunContext)
    graph.add_node("prepare", prepare)
    graph.add_node("round", round_)  # type: ignore[call-overload]  # Send payloads
    graph.add_node("collect", collect, defer=True)
    graph.add_edge(START, "prepare")
    graph.add_conditional_edges("prepare", fan_out, ["round", "collect"])
    graph.add_edge("round", "collect")
    graph.add_edge("collect", END)
    return graph.compile(checkpointer=checkpointer)
