"""Single-frame probing of an evaluation set (`vkr probe`), as in the VideoKR paper.

Each question, with its options and ONE random frame of its video, goes to each probe model
in independent trials (3 models x 3 trials by default; each trial has its own frame and
sample index). A question is single-frame-solvable for a model when every trial is right.
Questions no model solves are kept; the others are filtered out for expert re-annotation.
The report gives the single-frame answerable rate per model and per source benchmark
(the eval file's ``dataset`` field), like the paper's Table 2.

Frames are sampled once per video at 1 fps into ``OUT/frames/`` and chosen from there; every
call goes through :class:`vkr_core.calls.ModelCaller` with its cache in ``OUT/cache``, so a
rerun pays for nothing it already has. The step itself (prompts, message building, reply
parsing) is the ``single_frame_probe`` step plugin; this module never imports a plugin.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from hashlib import sha256
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from pydantic import BaseModel, ValidationError

from vkr_core.answers import answers_match, normalise
from vkr_core.calls import CallFailed, ModelCaller
from vkr_core.config import EligibilityRegistry, ModelSpec, Pool, load_pool, load_registry
from vkr_core.errors import describe_validation_error
from vkr_core.files import JsonlProblem, atomic_write, read_jsonl
from vkr_core.log import get_logger, redact, register_secrets
from vkr_core.router import Router, seeded_rng
from vkr_core.schemas import (
    CallRecord,
    EquivalenceJudgement,
    EvalQuestion,
    Frame,
    InputError,
    ModelProbe,
    ProbeTrial,
    Video,
    VkrError,
)
from vkr_core.steps import ReplyError
from vkr_core.store import RunLayout, RunStore

log = get_logger("vkr.probe")

PROBE_STEP = "single_frame_probe"
JUDGE_STEP = "judge_equivalence"
# The paper probes with three models, three trials each.
DEFAULT_MODEL_COUNT = 3
REPORT_VERSION = 1
# Bad eval lines listed in one error before "... and N more".
_MAX_LISTED_PROBLEMS = 20

__all__ = [
    "DEFAULT_MODEL_COUNT",
    "EvalItem",
    "JUDGE_STEP",
    "PROBE_STEP",
    "ProbeOptions",
    "ProbeResult",
    "ProbeStep",
    "load_eval_set",
    "probe_eval_set",
    "report_markdown",
    "run_probe",
    "select_models",
    "trial_frames",
    "video_key",
]


@runtime_checkable
class ProbeStep(Protocol):
    """What the registered ``single_frame_probe`` step must provide (a replacement too)."""

    name: str
    temperature: float
    max_tokens: int | None

    def version(self) -> str: ...

    def parse(self, text: str) -> BaseModel: ...

    def messages(self, question: EvalQuestion, frame: Frame) -> list[dict[str, Any]]: ...

    def judge_version(self) -> str: ...

    def judge_messages(
        self, question: EvalQuestion, reference: str, candidate: str
    ) -> list[dict[str, Any]]: ...

    def parse_judgement(self, text: str) -> EquivalenceJudgement: ...


@dataclass
class ProbeOptions:
    """How to probe. ``models`` None: the first three eligible models of the pool."""

    models: list[str] | None = None
    trials: int = 3
    seed: int = 0
    concurrency: int = 8
    judge: str | None = None
    fps: float = 1.0
    # 30 minutes at 1 fps, the longest video the collection keeps; longer videos are sampled
    # evenly at this many frames.
    max_frames: int = 1800
    max_side: int = 768
    jpeg_quality: int = 85
    decode_timeout: float = 120.0
    # Decoding is CPU-bound and runs in its own processes: more than the cores is no faster.
    decode_workers: int = 2
    # Sampled frames are reusable across probe runs of the same videos; default OUT/frames.
    frames_dir: str | Path | None = None
    allow_stale: bool = False

    def check(self) -> None:
        if self.trials < 1:
            raise InputError(f"--trials must be at least 1, got {self.trials}")
        if self.concurrency < 1:
            raise InputError(f"--concurrency must be at least 1, got {self.concurrency}")
        if self.decode_workers < 1:
            raise InputError(f"decode_workers must be at least 1, got {self.decode_workers}")
        if not self.fps > 0:
            raise InputError(f"fps must be positive, got {self.fps}")
        if self.max_frames < 1:
            raise InputError(f"max_frames must be at least 1, got {self.max_frames}")


@dataclass
class EvalItem:
    """One question of the eval file, with its line number and the line as read."""

    line: int
    question: EvalQuestion
    # Written back unchanged to kept.jsonl / filtered.jsonl, so those files are drop-in
    # replacements of the input, extra fields and all.
    raw: dict[str, Any]


@dataclass
class ProbeResult:
    report: dict[str, Any]
    paths: dict[str, Path] = field(default_factory=dict)


# ---------------------------------------------------------------- input


def load_eval_set(path: str | Path) -> list[EvalItem]:
    """Read and validate a VideoKR-Eval style jsonl; every bad line is named in one error."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"eval file not found: {p}")
    items: list[EvalItem] = []
    problems: list[str] = []
    first_line: dict[str, int] = {}

    def unreadable(bad: JsonlProblem) -> None:
        problems.append(f"line {bad.line}: {bad.reason}")

    for number, data in read_jsonl(p, on_problem=unreadable):
        label = f"line {number}" + (f" (id {data['id']!r})" if "id" in data else "")
        try:
            question = EvalQuestion.model_validate(data)
        except ValidationError as exc:
            problems.append(f"{label}: {describe_validation_error(exc)}")
            continue
        if question.id in first_line:
            problems.append(f"{label}: duplicate id (first on line {first_line[question.id]})")
            continue
        first_line[question.id] = number
        items.append(EvalItem(number, question, data))
    if problems:
        listed = problems[:_MAX_LISTED_PROBLEMS]
        more = len(problems) - len(listed)
        raise InputError(
            f"eval file {p} has {len(problems)} bad line(s); nothing was probed:\n  "
            + "\n  ".join(listed)
            + (f"\n  ... and {more} more" if more else "")
        )
    if not items:
        raise InputError(f"eval file {p} has no questions")
    return items


def video_key(video_path: str) -> str:
    """A folder name for a video's frames: readable, safe, and distinct per video path."""
    stem = re.sub(r"[^A-Za-z0-9_.\-]+", "_", video_path)
    stem = re.sub(r"\.{2,}", ".", stem).strip("._-")[:80] or "video"
    return f"{stem}-{sha256(video_path.encode()).hexdigest()[:8]}"


def _video_file(root: Path, video_path: str) -> Path:
    path = Path(video_path)
    return path if path.is_absolute() else root / path


def select_models(pool: Pool, router: Router, names: Sequence[str] | None) -> list[ModelSpec]:
    """The probe models: the named ones, else the first three eligible in pool order."""
    if names:
        seen: set[str] = set()
        for name in names:
            if name in seen:
                raise InputError(f"--models names {name!r} twice")
            seen.add(name)
        specs = [pool.get(name) for name in names]
        for spec in specs:
            if not spec.sees_images():
                raise InputError(
                    f"model {spec.name!r} is text-only (modality {spec.modality}): the "
                    "single-frame probe shows a frame, so every probe model must see images"
                )
        return specs
    eligible = router.eligible(PROBE_STEP)
    if len(eligible) < DEFAULT_MODEL_COUNT:
        stale = [s for s in router.stale if s[0] == PROBE_STEP]
        hint = (
            f" ({len(stale)} stale entr{'y' if len(stale) == 1 else 'ies'}: the prompt changed "
            "since qualification)"
            if stale
            else ""
        )
        names_found = ", ".join(m.name for m in eligible) or "none"
        raise InputError(
            f"the probe uses {DEFAULT_MODEL_COUNT} models, but only {len(eligible)} vision "
            f"model(s) of the pool are eligible for {PROBE_STEP!r} ({names_found}){hint}: "
            "qualify more, or name the models with --models"
        )
    return eligible[:DEFAULT_MODEL_COUNT]


def trial_frames(
    frames: Sequence[Frame], trials: int, seed: int, question_id: str, model: str
) -> list[Frame]:
    """The frame of each trial: distinct while the video has enough frames, reproducible from
    (seed, question id, model, trial)."""
    if not frames:
        raise InputError(f"question {question_id!r}: its video has no frames")
    rng = seeded_rng(seed, PROBE_STEP, question_id, model)
    order = rng.sample(range(len(frames)), min(trials, len(frames)))
    while len(order) < trials:  # fewer frames than trials: repeats are unavoidable
        order.append(rng.randrange(len(frames)))
    return [frames[i] for i in order]


# ---------------------------------------------------------------- probing


@dataclass
class _Video:
    key: str
    path: Path
    frames: list[Frame] | None = None
    failure: str | None = None


@dataclass
class _Probe:
    """What every trial of a probe run shares: step, judge, caller, output store, limits."""

    step: ProbeStep
    judge: ModelSpec | None
    caller: ModelCaller
    store: RunStore
    params: dict[str, Any]
    limit: asyncio.Semaphore
    on_trial: Callable[[], None] | None = None
    judgements: dict[tuple[str, str], asyncio.Future[EquivalenceJudgement | str]] = field(
        default_factory=dict
    )

    async def trial(
        self, item: EvalItem, video: _Video, spec: ModelSpec, number: int, frame: Frame
    ) -> ProbeTrial:
        question = item.question
        base: dict[str, Any] = {
            "trial": number,
            "frame_index": frame.index,
            "frame_timestamp": frame.timestamp,
            "frame_clock": frame.clock,
        }
        try:
            answer, outcome, note = await self._answer(item, video, spec, number, frame)
            if answer is None:
                return ProbeTrial(**base, outcome=outcome, correct=False, note=note)  # type: ignore[arg-type]
            if question.problem_type == "multiple-choice":
                right = answers_match("multiple choice", question.answer, answer)
                return ProbeTrial(
                    **base, answer=answer, outcome="right" if right else "wrong", correct=right
                )
            return await self._judged(base, question, answer)
        finally:
            if self.on_trial is not None:
                self.on_trial()

    async def _answer(
        self, item: EvalItem, video: _Video, spec: ModelSpec, number: int, frame: Frame
    ) -> tuple[str | None, str, str | None]:
        """The model's answer, or None with the outcome and why there is none."""
        messages = self.step.messages(item.question, frame)
        try:
            async with self.limit:
                result = await self.caller.call(
                    spec=spec,
                    step=PROBE_STEP,
                    prompt_version=self.step.version(),
                    messages=messages,
                    params=self.params,
                    sample=number,
                    video_id=video.key,
                    validate=self.step.parse,
                )
        except ReplyError as exc:
            return None, exc.kind if exc.kind == "refusal" else "malformed", exc.reason
        except CallFailed as exc:
            return None, "failed", str(exc)
        self._record_input(item, video, result.record.cache_key, messages, number)
        try:
            parsed = self.step.parse(result.text)
        except ReplyError as exc:
            return None, "malformed", f"{spec.name}: {exc.reason}"
        answer = getattr(parsed, "answer", None)
        if not isinstance(answer, str) or not answer.strip():
            return None, "malformed", f"{spec.name}: the reply has no answer"
        return answer.strip(), "ok", None

    async def _judged(
        self, base: dict[str, Any], question: EvalQuestion, answer: str
    ) -> ProbeTrial:
        """An open-ended answer: equal after normalising is right; otherwise the judge says."""
        expected = normalise(question.answer)
        if expected and normalise(answer) == expected:
            return ProbeTrial(**base, answer=answer, outcome="right", correct=True)
        assert self.judge is not None  # open-ended questions are probed only with a judge
        # Models often give the same wrong answer: one judgement per distinct answer, even
        # while the first is still in flight (the cache only helps once it has landed).
        key = (question.id, answer)
        pending = self.judgements.get(key)
        if pending is None:
            pending = asyncio.ensure_future(self._judge(question, answer))
            self.judgements[key] = pending
        verdict = await asyncio.shield(pending)
        if isinstance(verdict, str):
            return ProbeTrial(
                **base,
                answer=answer,
                outcome="failed",
                correct=False,
                note=f"judge {self.judge.name} could not decide: {verdict}",
            )
        return ProbeTrial(
            **base,
            answer=answer,
            outcome="right" if verdict.same else "wrong",
            correct=verdict.same,
            judged=True,
            note=verdict.reason or None,
        )

    async def _judge(self, question: EvalQuestion, answer: str) -> EquivalenceJudgement | str:
        """The judge's verdict, or why there is none."""
        assert self.judge is not None
        messages = self.step.judge_messages(question, question.answer, answer)
        try:
            async with self.limit:
                result = await self.caller.call(
                    spec=self.judge,
                    step=JUDGE_STEP,
                    prompt_version=self.step.judge_version(),
                    messages=messages,
                    params={"temperature": 0.0, "max_tokens": 256},
                    validate=self.step.parse_judgement,
                )
            return self.step.parse_judgement(result.text)
        except ReplyError as exc:
            return exc.reason
        except CallFailed as exc:
            return str(exc)

    def _record_input(
        self,
        item: EvalItem,
        video: _Video,
        key: str,
        messages: list[dict[str, Any]],
        number: int,
    ) -> None:
        # Kept like a run's step inputs, so `vkr qualify pilot --step single_frame_probe`
        # can sample real probe inputs from this directory.
        question = item.question
        discipline = item.raw.get("discipline")
        meta: dict[str, Any] = {"question_id": question.id, "dataset": question.dataset}
        if isinstance(item.raw.get("skill"), str):
            meta["skill"] = item.raw["skill"]
        record_video = Video(
            video_id=video.key,
            path=str(video.path),
            video_path=question.video_path,
            discipline=discipline if isinstance(discipline, str) else question.dataset,
            subject=question.subject,
        )
        self.store.record_input(
            PROBE_STEP, key, record_video, messages, {**meta, "trial": number}, self.step.version()
        )


def _status(trials: list[ProbeTrial]) -> str:
    if any(t.outcome != "failed" and not t.correct for t in trials):
        return "not solvable"
    if any(t.outcome == "failed" for t in trials):
        return "incomplete"
    return "solvable"


async def _sample_video(
    video: _Video, frames_root: Path, options: ProbeOptions, workers: asyncio.Semaphore, pm: Any
) -> None:
    """Sample the video's frames once (or reuse them); a failure is noted, never raised."""
    from vkr_core.video import sample_frames

    if not video.path.is_file():
        video.failure = f"video file not found: {video.path}"
    else:
        async with workers:
            try:
                video.frames = await asyncio.to_thread(
                    sample_frames,
                    video.path,
                    frames_root / video.key,
                    fps=options.fps,
                    max_frames=options.max_frames,
                    max_side=options.max_side,
                    jpeg_quality=options.jpeg_quality,
                    timeout=options.decode_timeout,
                    pm=pm,
                )
            except VkrError as exc:
                video.failure = str(exc)
            except Exception as exc:  # one bad video must not stop the others
                video.failure = f"{type(exc).__name__}: {exc}"
    if video.failure:
        log.warning("video not probed", video=str(video.path), reason=video.failure)


async def probe_eval_set(
    eval_file: str | Path,
    videos_root: str | Path,
    pool: str | Path | Pool,
    out_dir: str | Path,
    options: ProbeOptions | None = None,
    pm: Any = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> ProbeResult:
    """Probe every question of ``eval_file``; write trials, kept, filtered and the report.

    ``on_progress(done, total)`` hears each finished trial. Errors in the inputs (eval lines,
    models, judge) are raised before any call is paid for; a video that cannot be decoded
    only makes its questions "unprobed".
    """
    from vkr_core.plugins import get_plugin_manager

    options = options or ProbeOptions()
    options.check()
    items = load_eval_set(eval_file)
    root = Path(videos_root)
    if not root.is_dir():
        raise InputError(f"videos root is not a folder: {root}")
    pm = pm or get_plugin_manager()
    step = pm.registry.get("step", PROBE_STEP)
    if not isinstance(step, ProbeStep):
        raise InputError(
            f"the registered {PROBE_STEP!r} step ({type(step).__name__}) lacks what the probe "
            "needs: messages, parse, judge_messages, parse_judgement, judge_version"
        )
    pool = pool if isinstance(pool, Pool) else load_pool(pool)
    register_secrets(spec.api_key() for spec in pool.models)
    registry_path = pool.registry_path()
    if registry_path is None and not options.models:
        raise InputError(
            "the pool names no eligibility registry (`registry:`), so no model is eligible "
            f"for {PROBE_STEP!r}: name the probe models with --models"
        )
    registry = load_registry(registry_path) if registry_path else EligibilityRegistry()
    router = Router(pool, registry, pm.registry.steps, options.seed, options.allow_stale)
    models = select_models(pool, router, options.models)
    judge = pool.get(options.judge) if options.judge else None
    for spec in [*models, *([judge] if judge else [])]:
        if spec.provider not in pm.registry.providers:
            raise InputError(
                f"model {spec.name!r} names provider {spec.provider!r}, which no plugin "
                f"registers (loaded: {', '.join(sorted(pm.registry.providers))})"
            )

    videos: dict[str, _Video] = {}
    for item in items:
        path = item.question.video_path
        if path not in videos:
            videos[path] = _Video(video_key(path), _video_file(root, path))
    missing = [v for v in videos.values() if not v.path.is_file()]
    if len(missing) == len(videos):
        raise InputError(
            f"none of the {len(videos)} video(s) of the eval file is under {root} "
            f"(first: {missing[0].path}): is --videos-root right?"
        )

    out = Path(out_dir)
    store = RunStore(out)
    frames_root = Path(options.frames_dir) if options.frames_dir else store.layout.frames_root
    params: dict[str, Any] = {"temperature": step.temperature}
    conf = pool.steps.get(PROBE_STEP)
    if conf and conf.temperature is not None:
        params["temperature"] = conf.temperature
    max_tokens = conf.max_tokens if conf and conf.max_tokens else step.max_tokens
    if max_tokens:
        params["max_tokens"] = max_tokens

    skipped = [
        item for item in items if item.question.problem_type == "open-ended" and judge is None
    ]
    skipped_ids = {item.question.id for item in skipped}
    per_video: dict[str, list[EvalItem]] = {}
    for item in items:
        if item.question.id not in skipped_ids:
            per_video.setdefault(item.question.video_path, []).append(item)

    records: list[CallRecord] = []

    def on_record(record: CallRecord) -> None:
        records.append(record)
        store.append_call(record)

    progress = {
        "done": 0,
        "total": sum(map(len, per_video.values())) * len(models) * options.trials,
    }

    def report_progress(done: int = 1, dropped: int = 0) -> None:
        progress["done"] += done
        progress["total"] -= dropped
        if on_progress is not None:
            on_progress(progress["done"], progress["total"])

    caller = ModelCaller(
        cache_dir=store.cache_dir, providers=pm.registry.providers, on_record=on_record
    )
    probe = _Probe(
        step=step,
        judge=judge,
        caller=caller,
        store=store,
        params=params,
        limit=asyncio.Semaphore(options.concurrency),
        on_trial=report_progress,
    )
    workers = asyncio.Semaphore(options.decode_workers)
    results: dict[tuple[str, str], list[ProbeTrial]] = {}

    async def probe_video(video: _Video, video_items: list[EvalItem]) -> None:
        # A video's questions start as soon as its frames are ready, while others decode.
        await _sample_video(video, frames_root, options, workers, pm)
        if video.frames is None:
            report_progress(0, len(video_items) * len(models) * options.trials)
            return
        keys, jobs = [], []
        for item in video_items:
            for spec in models:
                chosen = trial_frames(
                    video.frames, options.trials, options.seed, item.question.id, spec.name
                )
                keys.append((item.question.id, spec.name))
                jobs.append(
                    asyncio.gather(
                        *(probe.trial(item, video, spec, n, f) for n, f in enumerate(chosen))
                    )
                )
        for key, trials in zip(keys, await asyncio.gather(*jobs), strict=True):
            results[key] = list(trials)

    try:
        await asyncio.gather(
            *(probe_video(videos[path], group) for path, group in per_video.items())
        )
    finally:
        await caller.aclose()

    unprobed: dict[str, str] = {}
    rows: list[ModelProbe] = []
    for item in items:
        question = item.question
        video = videos[question.video_path]
        if question.id in skipped_ids:
            continue
        if video.failure is not None:
            unprobed[question.id] = f"video not probed: {video.failure}"
            continue
        for spec in models:
            these = results[(question.id, spec.name)]
            status = _status(these)
            rows.append(
                ModelProbe(
                    id=question.id,
                    dataset=question.dataset,
                    problem_type=question.problem_type,
                    video_path=question.video_path,
                    model=spec.name,
                    solution=question.answer,
                    trials=these,
                    right=sum(t.correct for t in these),
                    status=status,  # type: ignore[arg-type]
                    solvable=status == "solvable",
                )
            )
    fate = _fates(items, rows, skipped_ids, unprobed)
    report = _build_report(
        items,
        rows,
        fate,
        models,
        judge,
        skipped,
        unprobed,
        videos,
        records,
        options,
        eval_file,
        root,
    )
    report["step_version"] = step.version()
    if judge is not None:
        report["judge_version"] = step.judge_version()
    paths = _write_outputs(out, items, rows, report, skipped, unprobed)
    return ProbeResult(report, paths)


def run_probe(
    eval_file: str | Path,
    videos_root: str | Path,
    pool: str | Path | Pool,
    out_dir: str | Path,
    options: ProbeOptions | None = None,
    pm: Any = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> ProbeResult:
    """:func:`probe_eval_set` from synchronous code."""
    return asyncio.run(
        probe_eval_set(eval_file, videos_root, pool, out_dir, options, pm, on_progress)
    )


# ---------------------------------------------------------------- report


def _rate(solvable: int, scored: int) -> dict[str, Any]:
    return {
        "solvable": solvable,
        "scored": scored,
        "rate": round(solvable / scored, 6) if scored else None,
    }


def _fates(
    items: list[EvalItem], rows: list[ModelProbe], skipped: set[str], unprobed: dict[str, str]
) -> dict[str, str]:
    """Each question's fate: kept, filtered, skipped (kept unscored) or unprobed.

    A question some model solves is filtered even if another model's trials failed; one
    that no model solves but whose trials were not all decided is unprobed (added to
    ``unprobed`` with the reason), never silently kept.
    """
    by_question: dict[str, list[ModelProbe]] = {}
    for row in rows:
        by_question.setdefault(row.id, []).append(row)
    fate: dict[str, str] = {}
    for item in items:
        qid = item.question.id
        probes = by_question.get(qid, [])
        if qid in unprobed:
            fate[qid] = "unprobed"
        elif qid in skipped:
            fate[qid] = "skipped"
        elif any(p.solvable for p in probes):
            fate[qid] = "filtered"
        elif any(p.status == "incomplete" for p in probes):
            undecided = ", ".join(p.model for p in probes if p.status == "incomplete")
            fate[qid] = "unprobed"
            unprobed[qid] = f"incomplete: trials of {undecided} could not be decided"
        else:
            fate[qid] = "kept"
    return fate


def _build_report(
    items: list[EvalItem],
    rows: list[ModelProbe],
    fate: dict[str, str],
    models: list[ModelSpec],
    judge: ModelSpec | None,
    skipped: list[EvalItem],
    unprobed: dict[str, str],
    videos: dict[str, _Video],
    records: list[CallRecord],
    options: ProbeOptions,
    eval_file: str | Path,
    root: Path,
) -> dict[str, Any]:
    names = [m.name for m in models]

    def tally(selected: list[EvalItem]) -> dict[str, Any]:
        ids = {item.question.id for item in selected}
        counts = {
            kind: sum(1 for q in ids if fate[q] == kind)
            for kind in ("kept", "filtered", "skipped", "unprobed")
        }
        scored = counts["kept"] + counts["filtered"]
        per_model = {}
        for name in names:
            mine = [r for r in rows if r.id in ids and r.model == name and r.status != "incomplete"]
            trials = [t for r in mine for t in r.trials if t.outcome != "failed"]
            entry = _rate(sum(r.solvable for r in mine), len(mine))
            entry["trials"] = len(trials)
            entry["right_trials"] = sum(t.correct for t in trials)
            entry["trial_accuracy"] = (
                round(entry["right_trials"] / len(trials), 6) if trials else None
            )
            per_model[name] = entry
        return {
            "questions": len(ids),
            "scored": scored,
            "kept": counts["kept"] + counts["skipped"],
            "kept_scored": counts["kept"],
            "filtered": counts["filtered"],
            "skipped_open_ended": counts["skipped"],
            "unprobed": counts["unprobed"],
            "any_model": _rate(counts["filtered"], scored),
            "models": per_model,
        }

    datasets = sorted({item.question.dataset for item in items})
    overall = tally(items)
    notes = []
    if skipped:
        notes.append(
            f"{len(skipped)} open-ended question{'s' if len(skipped) != 1 else ''} skipped: "
            "no judge configured (they are kept, unscored; pass --judge MODEL to score them)"
        )
    failed_videos = sorted(v.path.name for v in videos.values() if v.failure)
    if failed_videos:
        notes.append(
            f"{len(failed_videos)} video(s) could not be decoded or found: their questions are "
            "unprobed (see unprobed.jsonl)"
        )
    incomplete = sum(1 for reason in unprobed.values() if reason.startswith("incomplete"))
    if incomplete:
        notes.append(
            f"{incomplete} question(s) incomplete: calls failed or the judge could not decide; "
            "run the same command again to retry the calls that failed"
        )
    by_item = {item.question.id: item for item in items}
    return {
        "version": REPORT_VERSION,
        "eval_file": str(eval_file),
        "videos_root": str(root),
        "models": names,
        "model_selection": "--models" if options.models else "eligible models, pool order",
        "judge": judge.name if judge else None,
        "trials": options.trials,
        "seed": options.seed,
        "fps": options.fps,
        "counts": {
            key: overall[key]
            for key in (
                "questions",
                "scored",
                "kept",
                "kept_scored",
                "filtered",
                "skipped_open_ended",
                "unprobed",
            )
        },
        "any_model": overall["any_model"],
        "by_model": overall["models"],
        "by_dataset": {
            name: tally([item for item in items if item.question.dataset == name])
            for name in datasets
        },
        "unprobed": [
            {
                "id": qid,
                "dataset": by_item[qid].question.dataset,
                "video_path": by_item[qid].question.video_path,
                "reason": redact(reason),
            }
            for qid, reason in unprobed.items()
        ],
        "notes": notes,
        "calls": _call_summary(records),
    }


def _call_summary(records: list[CallRecord]) -> dict[str, Any]:
    paid = [r for r in records if not r.cache_hit and r.outcome != "error"]
    by_step: dict[str, dict[str, int]] = {}
    for record in records:
        entry = by_step.setdefault(record.step, {"paid": 0, "cached": 0, "failed": 0})
        if record.cache_hit:
            entry["cached"] += 1
        elif record.outcome == "error":
            entry["failed"] += 1
        else:
            entry["paid"] += 1
    return {
        "paid": len(paid),
        "cached": sum(r.cache_hit for r in records),
        "failed": sum(1 for r in records if not r.cache_hit and r.outcome == "error"),
        "cost_usd": round(sum(r.cost_usd for r in paid), 6),
        "by_step": dict(sorted(by_step.items())),
    }


def _cell(entry: dict[str, Any]) -> str:
    if not entry["scored"]:
        return "–"
    return (
        f"{100 * entry['solvable'] / entry['scored']:.1f} ({entry['solvable']}/{entry['scored']})"
    )


def report_markdown(report: dict[str, Any]) -> str:
    """The report as markdown: the answerable-rate table (the paper's Table 2) and counts."""
    names: list[str] = report["models"]
    counts = report["counts"]
    lines = [
        "# Single-frame probe",
        "",
        f"Eval file `{report['eval_file']}`; models {', '.join(names)} "
        f"({report['model_selection']}); {report['trials']} trial(s) each, one random frame "
        f"per trial; seed {report['seed']}; judge {report['judge'] or 'none'}.",
        "",
        "## Single-frame answerable rate, % (solvable/scored)",
        "",
        "A question is single-frame-solvable for a model when all its trials are right.",
        "",
        "| Dataset | Questions | Scored | " + " | ".join(names) + " | Any model | Kept |",
        "|---|---:|---:|" + "---:|" * len(names) + "---:|---:|",
    ]

    def row(label: str, entry: dict[str, Any]) -> str:
        cells = [_cell(entry["models"][name]) for name in names]
        return (
            f"| {label} | {entry['questions']} | {entry['scored']} | "
            + " | ".join(cells)
            + f" | {_cell(entry['any_model'])} | {entry['kept']} |"
        )

    for name, entry in report["by_dataset"].items():
        lines.append(row(name.replace("|", "\\|"), entry))
    overall = {
        "questions": counts["questions"],
        "scored": counts["scored"],
        "kept": counts["kept"],
        "models": report["by_model"],
        "any_model": report["any_model"],
    }
    lines.append(row("**All**", overall))
    lines += ["", "Trial accuracy (right trials / decided trials): "]
    lines[-1] += "; ".join(
        f"{name} {_cell({'solvable': e['right_trials'], 'scored': e['trials']})}"
        for name, e in report["by_model"].items()
    )
    lines += [
        "",
        "## Counts",
        "",
        f"- questions: {counts['questions']}",
        f"- kept (no model solved it): {counts['kept']} in `kept.jsonl`"
        + (
            f", of which {counts['skipped_open_ended']} open-ended not scored"
            if counts["skipped_open_ended"]
            else ""
        ),
        f"- filtered (single-frame-solvable, for expert re-annotation): {counts['filtered']} "
        "in `filtered.jsonl`",
        f"- skipped: {counts['skipped_open_ended']} open-ended (no judge configured)"
        if report["judge"] is None
        else "- skipped: 0",
        f"- unprobed: {counts['unprobed']} in `unprobed.jsonl`",
    ]
    if report["notes"]:
        lines += ["", "## Notes", ""] + [f"- {note}" for note in report["notes"]]
    if report["unprobed"]:
        lines += ["", "## Unprobed questions", ""]
        for entry in report["unprobed"][:50]:
            lines.append(f"- `{entry['id']}` ({entry['video_path']}): {entry['reason']}")
        if len(report["unprobed"]) > 50:
            lines.append(f"- ... and {len(report['unprobed']) - 50} more in `unprobed.jsonl`")
    calls = report["calls"]
    lines += [
        "",
        "## Calls",
        "",
        f"{calls['paid']} paid, {calls['cached']} from cache, {calls['failed']} failed; "
        f"cost ${calls['cost_usd']:.4f}.",
    ]
    return "\n".join(lines) + "\n"


def _jsonl(rows: list[dict[str, Any]]) -> str:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def _write_outputs(
    out: Path,
    items: list[EvalItem],
    rows: list[ModelProbe],
    report: dict[str, Any],
    skipped: list[EvalItem],
    unprobed: dict[str, str],
) -> dict[str, Path]:
    solved_by: dict[str, list[ModelProbe]] = {}
    for row in rows:
        if row.solvable:
            solved_by.setdefault(row.id, []).append(row)
    kept, filtered, left_out = [], [], []
    for item in items:
        qid = item.question.id
        if qid in unprobed:
            left_out.append({**item.raw, "unprobed_reason": redact(unprobed[qid])})
        elif qid in solved_by:
            probes = solved_by[qid]
            filtered.append(
                {
                    **item.raw,
                    "solved_by": [p.model for p in probes],
                    # Which frames gave the answer away: what an annotator looks at first.
                    "solving_frames": {
                        p.model: [t.frame_timestamp for t in p.trials] for p in probes
                    },
                }
            )
        else:
            kept.append(item.raw)
    paths = {
        "trials": out / "trials.jsonl",
        "kept": out / "kept.jsonl",
        "filtered": out / "filtered.jsonl",
        "unprobed": out / "unprobed.jsonl",
        "report_json": RunLayout(out).report("json"),
        "report_md": RunLayout(out).report("md"),
    }
    atomic_write(paths["trials"], _jsonl([row.model_dump() for row in rows]))
    atomic_write(paths["kept"], _jsonl(kept))
    atomic_write(paths["filtered"], _jsonl(filtered))
    atomic_write(paths["unprobed"], _jsonl(left_out))
    atomic_write(paths["report_json"], json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    atomic_write(paths["report_md"], report_markdown(report))
    return paths
