"""The single-frame probe pipeline: per video, each question x probe model x trial with one
random frame, and the judge on open-ended answers.

One item is one video with its evaluation questions (corpus.probe.ProbeVideo): its frames are
sampled once, at 1 fps, ahead of its turn (``prepare``), and every trial of every question
picks its frame from them. The probe models are the ones ``vkr probe`` was given (or the
first eligible in pool order), not a router's pick per instance, so the pipeline routes no
step (``model_steps`` is empty) and names its models to the engine (``fixed_models``), which
preflights them. There is no graph to checkpoint: each trial is one call, and the run's call
cache and journal are what a rerun resumes from. ``vkr probe`` (corpus/probe.py) builds the
items and writes the probe's files from the records.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

from corpus.probe import (
    PIPELINE,
    PROBE_STEP,
    ProbeConfig,
    ProbeRecord,
    ProbeVideo,
    probe_status,
    select_models,
    trial_frames,
)
from vkr_core.answers import answers_match, normalise
from vkr_core.calls import CallFailed
from vkr_core.config import ModelSpec
from vkr_core.context import RunContext, StepContext
from vkr_core.health import Route, set_route
from vkr_core.hookspecs import hookimpl
from vkr_core.log import get_logger
from vkr_core.pipelines import Items, Pipeline, PipelineRun
from vkr_core.router import Router
from vkr_core.schemas import (
    EquivalenceJudgement,
    EvalQuestion,
    Frame,
    InputError,
    ModelProbe,
    ProbeTrial,
    Video,
    VkrError,
    is_disk_full,
)
from vkr_core.steps import ReplyError, Step
from vkr_core.video import FrameSource

log = get_logger("vkr.probe")

Outcome = Literal["right", "wrong", "malformed", "refusal", "failed"]

RUN_BY_PROBE = (
    "the probe pipeline runs through `vkr probe --eval FILE --videos-root DIR --pool POOL "
    "--out DIR`: it reads an eval set and writes kept and filtered files and a report"
)


@runtime_checkable
class FrameProbe(Protocol):
    """What the registered ``single_frame_probe`` step provides (a replacement too): the
    step builds its own inputs and makes each call through ``ctx`` (the engine's call)."""

    name: str
    # The step that decides whether an open-ended answer means the solution.
    judge: Step[Any, EquivalenceJudgement]

    def version(self) -> str: ...

    async def answer(
        self, ctx: StepContext, question: EvalQuestion, frame: Frame, *, spec: ModelSpec, trial: int
    ) -> Any: ...

    async def same_meaning(
        self, ctx: StepContext, question: EvalQuestion, candidate: str, *, spec: ModelSpec
    ) -> EquivalenceJudgement: ...


def _probe_step(registry: Any) -> FrameProbe:
    step = registry.get("step", PROBE_STEP)
    if not isinstance(step, FrameProbe):
        raise InputError(
            f"the registered {PROBE_STEP!r} step ({type(step).__name__}) lacks what the probe "
            "needs: answer(ctx, question, frame, spec=, trial=), same_meaning(ctx, question, "
            "candidate, spec=) and a judge step"
        )
    return step


def _config(config: Any) -> ProbeConfig:
    if not isinstance(config, ProbeConfig):
        raise InputError(RUN_BY_PROBE)
    return config


def _chosen(
    router: Router, config: ProbeConfig, registry: Any
) -> tuple[list[ModelSpec], ModelSpec | None]:
    """The probe models and the judge, checked against the pool and the loaded providers."""
    pool = router.pool
    models = select_models(pool, router, config.models)
    judge = pool.get(config.judge) if config.judge else None
    for spec in [*models, *([judge] if judge else [])]:
        if spec.provider not in registry.providers:
            raise InputError(
                f"model {spec.name!r} names provider {spec.provider!r}, which no plugin "
                f"registers (loaded: {', '.join(sorted(registry.providers))})"
            )
    return models, judge


def _reason(exc: BaseException) -> str:
    return str(exc) if isinstance(exc, VkrError) else f"{type(exc).__name__}: {exc}"


class ProbeRun(PipelineRun):
    def __init__(
        self,
        context: RunContext,
        step: FrameProbe,
        models: list[ModelSpec],
        judge: ModelSpec | None,
    ):
        self.context = context
        self.config = _config(context.config)
        self.step = step
        self.models = models
        self.judge = judge
        self.frames_root = (
            Path(self.config.frames_dir)
            if self.config.frames_dir
            else context.store.layout.frames_root
        )
        # `--concurrency` counts model calls in flight, whatever video they are for.
        self.calls = asyncio.Semaphore(self.config.concurrency)
        # Frames are chosen per trial and not needed once the video is probed: none kept.
        self._frames = FrameSource(
            self.config.decode_workers, keep=0, thread_name="vkr-probe-decode"
        )
        self._route = tuple(spec.name for spec in models)

    # ------------------------------------------------------------ frames

    def _decode_call(self, item: ProbeVideo) -> Callable[[], list[Frame]]:
        from vkr_core.video import sample_frames

        path = Path(item.path)
        config = self.config

        def decode() -> list[Frame]:
            if not path.is_file():
                raise InputError(f"video file not found: {path}")
            return sample_frames(
                path,
                self.frames_root / item.item_id,
                fps=config.fps,
                max_frames=config.max_frames,
                max_side=config.max_side,
                jpeg_quality=config.jpeg_quality,
                timeout=config.decode_timeout,
                pm=self.context.pm,
            )

        return decode

    async def prepare(self, item: ProbeVideo) -> None:
        # A failure waits for process(), which records it: the file is not decoded twice.
        await self._frames.prefetch(item.item_id, self._decode_call(item))

    # ------------------------------------------------------------ one video

    async def process(self, item: ProbeVideo) -> ProbeRecord:
        try:
            return await self._probe_video(item)
        except Exception as exc:
            # The engine records the failure; the record says so too, so the probe's files
            # never show an earlier probe's trials for this video.
            if not is_disk_full(exc):
                self._write(self._failed(item, _reason(exc)))
            raise
        finally:
            self._frames.forget(item.item_id)

    def _failed(self, item: ProbeVideo, reason: str) -> ProbeRecord:
        return ProbeRecord(
            item_id=item.item_id, video_path=item.video_path, status="failed", failure=reason
        )

    def _write(self, record: ProbeRecord) -> ProbeRecord:
        self.context.store.write_record(record)
        return record

    async def _probe_video(self, item: ProbeVideo) -> ProbeRecord:
        store = self.context.store
        try:
            frames = await self._frames.get(item.item_id, self._decode_call(item))
        except Exception as exc:
            # A decoder that failed because the frames could not be written is not a bad video.
            if is_disk_full(exc) or store.low_on_space():
                raise store.disk_full_error(exc) from None
            failure = _reason(exc)
            log.warning("video not probed", video=item.path, reason=failure)
            store.add_failure(item.item_id, failure, item.path)
            return self._write(self._failed(item, failure))
        # Models often give the same wrong answer: one judgement per distinct (question,
        # answer), even while the first is in flight (the cache only helps once it landed).
        judgements: dict[tuple[str, str], asyncio.Future[EquivalenceJudgement | str]] = {}
        probes = await asyncio.gather(
            *(
                self._model_probe(item, question, spec, frames, judgements)
                for question in item.questions
                for spec in self.models
            )
        )
        return self._write(
            ProbeRecord(
                item_id=item.item_id,
                video_path=item.video_path,
                status="done",
                frames=len(frames),
                probes=list(probes),
            )
        )

    def _video(self, item: ProbeVideo, question: EvalQuestion) -> Video:
        # What the step inputs kept for qualification pilots say about where they came from.
        discipline = getattr(question, "discipline", None)
        return Video(
            video_id=item.item_id,
            path=item.path,
            video_path=question.video_path,
            discipline=discipline if isinstance(discipline, str) else question.dataset,
            subject=question.subject,
        )

    async def _model_probe(
        self,
        item: ProbeVideo,
        question: EvalQuestion,
        spec: ModelSpec,
        frames: list[Frame],
        judgements: dict[tuple[str, str], asyncio.Future[EquivalenceJudgement | str]],
    ) -> ModelProbe:
        config = self.config
        chosen = trial_frames(frames, config.trials, config.seed, question.id, spec.name)
        ctx = StepContext(self.context, self._video(item, question), frames)
        trials = list(
            await asyncio.gather(
                *(
                    self._trial(ctx, question, spec, number, frame, judgements)
                    for number, frame in enumerate(chosen)
                )
            )
        )
        status = probe_status(trials)
        return ModelProbe(
            id=question.id,
            dataset=question.dataset,
            problem_type=question.problem_type,
            video_path=question.video_path,
            model=spec.name,
            solution=question.answer,
            trials=trials,
            right=sum(t.correct for t in trials),
            status=status,
            solvable=status == "solvable",
        )

    # ------------------------------------------------------------ one trial

    async def _trial(
        self,
        ctx: StepContext,
        question: EvalQuestion,
        spec: ModelSpec,
        number: int,
        frame: Frame,
        judgements: dict[tuple[str, str], asyncio.Future[EquivalenceJudgement | str]],
    ) -> ProbeTrial:
        base: dict[str, Any] = {
            "trial": number,
            "frame_index": frame.index,
            "frame_timestamp": frame.timestamp,
            "frame_clock": frame.clock,
        }
        # The probe needs every one of its models: a call to one that is down waits for it
        # rather than failing its trial (the run pauses, as for any fixed model set).
        set_route(Route(self.step.name, spec.name, spec.name, self._route, fixed=True))
        try:
            async with self.calls:
                output = await self.step.answer(ctx, question, frame, spec=spec, trial=number)
        except ReplyError as exc:
            unusable: Outcome = "refusal" if exc.kind == "refusal" else "malformed"
            return ProbeTrial(**base, outcome=unusable, correct=False, note=exc.reason)
        except CallFailed as exc:
            return ProbeTrial(**base, outcome="failed", correct=False, note=str(exc))
        answer = getattr(output, "answer", None)
        if not isinstance(answer, str) or not answer.strip():
            note = f"{spec.name}: the reply has no answer"
            return ProbeTrial(**base, outcome="malformed", correct=False, note=note)
        answer = answer.strip()
        if question.problem_type == "multiple-choice":
            right = answers_match("multiple choice", question.answer, answer)
            decided: Outcome = "right" if right else "wrong"
            return ProbeTrial(**base, answer=answer, outcome=decided, correct=right)
        return await self._judged(ctx, base, question, answer, judgements)

    async def _judged(
        self,
        ctx: StepContext,
        base: dict[str, Any],
        question: EvalQuestion,
        answer: str,
        judgements: dict[tuple[str, str], asyncio.Future[EquivalenceJudgement | str]],
    ) -> ProbeTrial:
        """An open-ended answer: equal after normalising is right; otherwise the judge says."""
        expected = normalise(question.answer)
        if expected and normalise(answer) == expected:
            return ProbeTrial(**base, answer=answer, outcome="right", correct=True)
        judge = self.judge
        assert judge is not None  # open-ended questions are probed only with a judge
        key = (question.id, answer)
        pending = judgements.get(key)
        if pending is None:
            pending = judgements[key] = asyncio.ensure_future(self._judge(ctx, question, answer))
        verdict = await asyncio.shield(pending)
        if isinstance(verdict, str):
            note = f"judge {judge.name} could not decide: {verdict}"
            return ProbeTrial(**base, answer=answer, outcome="failed", correct=False, note=note)
        return ProbeTrial(
            **base,
            answer=answer,
            outcome="right" if verdict.same else "wrong",
            correct=verdict.same,
            judged=True,
            note=verdict.reason or None,
        )

    async def _judge(
        self, ctx: StepContext, question: EvalQuestion, answer: str
    ) -> EquivalenceJudgement | str:
        """The judge's verdict, or why there is none."""
        judge = self.judge
        assert judge is not None
        set_route(Route(self.step.judge.name, judge.name, judge.name, (judge.name,), fixed=True))
        try:
            async with self.calls:
                return await self.step.same_meaning(ctx, question, answer, spec=judge)
        except ReplyError as exc:
            return exc.reason
        except CallFailed as exc:
            return str(exc)

    async def close(self) -> None:
        self._frames.close()


class ProbePipeline(Pipeline):
    """The single-frame probe: evaluation questions no model answers from one random frame
    are kept; the others go to expert re-annotation (the paper's stage 15, Table 2)."""

    name = PIPELINE
    description = "eval questions -> those no model answers from one random frame (stage 15)"
    noun = "video"
    item_schema = ProbeVideo
    id_field = "item_id"

    def model_steps(self, registry: Any) -> list[str]:
        # The models are the probe's own choice (--models, or the first eligible): nothing
        # is routed per instance.
        return []

    def check(self, run: Any) -> None:
        config = _config(run.config)
        _probe_step(run.registry)
        _chosen(run.router, config, run.registry)

    def fixed_models(self, run: Any) -> list[Any]:
        models, judge = _chosen(run.router, _config(run.config), run.registry)
        return [*models, *([judge] if judge else [])]

    def snapshot(self, run: Any) -> dict[str, Any]:
        models, judge = _chosen(run.router, _config(run.config), run.registry)
        return {"models": [spec.name for spec in models], "judge": judge.name if judge else None}

    def read_items(self, path: str | Path, config: Any) -> Items:
        raise InputError(RUN_BY_PROBE)

    async def open(self, context: RunContext, checkpointer: Any) -> ProbeRun:
        models, judge = _chosen(context.router, _config(context.config), context.registry)
        return ProbeRun(context, _probe_step(context.registry), models, judge)

    def failed(self, item: ProbeVideo, reason: str) -> ProbeRecord:
        return ProbeRecord(
            item_id=item.item_id, video_path=item.video_path, status="failed", failure=reason
        )


@hookimpl
def vkr_register_pipelines(register: Any) -> None:
    register(ProbePipeline())
