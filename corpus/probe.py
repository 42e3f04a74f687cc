"""Single-frame probing of an evaluation set (`vkr probe`), as in the VideoKR paper.

Each question, with its options and ONE random frame of its video, goes to each probe model
in independent trials (3 models x 3 trials by default; each trial has its own frame and
sample index). A question is single-frame-solvable for a model when every trial is right.
Questions no model solves are kept; the others are filtered out for expert re-annotation.
The report gives the single-frame answerable rate per model and per source benchmark
(the eval file's ``dataset`` field), like the paper's Table 2.

The probing itself is the ``probe`` pipeline (graphs/probe.py) on the engine
(``vkr_core.run``): one item is one video with its questions, its frames sampled once at
1 fps (into ``OUT/frames/`` unless ``frames_dir`` says otherwise) ahead of its turn; every
call goes through the run's caller with its cache and journal in ``OUT/cache``, so a rerun,
even of a probe killed with SIGKILL, pays for nothing it already has. This module is the
application around it: the eval set, the items and settings it hands the engine, and the
files it writes from the records (trials, kept, filtered, unprobed, the report). It never
imports a plugin or a graph: the engine finds the pipeline by its name.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from hashlib import sha256
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError

from vkr_core.config import ModelSpec, Pool, RunConfig, load_pool
from vkr_core.errors import describe_validation_error
from vkr_core.files import JsonlProblem, atomic_write, read_jsonl
from vkr_core.log import redact
from vkr_core.router import Router, seeded_rng
from vkr_core.schemas import (
    CallRecord,
    EvalQuestion,
    Frame,
    InputError,
    ModelProbe,
    ProbeTrial,
    Strict,
)
from vkr_core.store import RunLayout, RunStore

# The registered pipeline that probes (graphs/probe.py) and the step it calls.
PIPELINE = "probe"
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
    "PIPELINE",
    "PROBE_STEP",
    "ProbeConfig",
    "ProbeOptions",
    "ProbeRecord",
    "ProbeResult",
    "ProbeVideo",
    "load_eval_set",
    "probe_eval_set",
    "probe_status",
    "report_markdown",
    "run_probe",
    "select_models",
    "trial_frames",
    "video_key",
]


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
    # Outages (vkr_core.preflight, vkr_core.health): they change no result.
    skip_preflight: bool = False
    cooldown: float = 10.0

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

    def config(self, videos_root: Path) -> ProbeConfig:
        """The run's config: the engine's settings and the probe's own."""
        try:
            return ProbeConfig(
                seed=self.seed,
                fps=self.fps,
                max_frames=self.max_frames,
                max_side=self.max_side,
                jpeg_quality=self.jpeg_quality,
                decode_timeout=self.decode_timeout,
                allow_stale=self.allow_stale,
                video_root=str(videos_root.resolve()),
                models=self.models,
                judge=self.judge,
                trials=self.trials,
                frames_dir=str(Path(self.frames_dir).resolve()) if self.frames_dir else None,
                concurrency=self.concurrency,
                decode_workers=self.decode_workers,
                skip_preflight=self.skip_preflight,
                cooldown=self.cooldown,
            )
        except ValidationError as exc:
            raise InputError(f"probe options: {describe_validation_error(exc)}") from None


class ProbeConfig(RunConfig):
    """A probe run's config: the engine's settings, and the probe's own below."""

    pipeline: str = PIPELINE
    # Nothing to checkpoint: each trial is one call, and the call cache and journal are
    # what a rerun resumes from.
    checkpointer: str = "memory"
    fps: float = Field(default=1.0, gt=0)
    max_frames: int = Field(default=1800, ge=1)
    # The probe models by name; None: the first DEFAULT_MODEL_COUNT eligible, pool order.
    models: list[str] | None = Field(default=None, min_length=1)
    # The pool model that decides open-ended answers; None: they are kept unscored.
    judge: str | None = None
    trials: int = Field(default=3, ge=1)
    # Where sampled frames go (absolute); None: the run directory's frames/.
    frames_dir: str | None = None
    # How fast, not what: left out of the config snapshot.
    concurrency: int = Field(default=8, ge=1, exclude=True)
    decode_workers: int = Field(default=2, ge=1, exclude=True)


class ProbeVideo(Strict):
    """One item of a probe run: a video and the questions asked about it (their frames are
    sampled once per video)."""

    item_id: str
    # As the eval file writes it (relative to the videos root), and the file itself.
    video_path: str
    path: str
    questions: list[EvalQuestion] = Field(min_length=1)


class ProbeRecord(Strict):
    """What probing one video found, in ``OUT/records/<item_id>.json``."""

    item_id: str
    video_path: str
    status: Literal["done", "failed"]
    failure: str | None = None
    frames: int = 0
    # One row per (question, model), in question then model order.
    probes: list[ModelProbe] = Field(default_factory=list)


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
    if pool.registry_path() is None:
        raise InputError(
            "the pool names no eligibility registry (`registry:`), so no model is eligible "
            f"for {PROBE_STEP!r}: name the probe models with --models"
        )
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


def probe_status(trials: Sequence[ProbeTrial]) -> Literal["solvable", "not solvable", "incomplete"]:
    """One model on one question: solvable when every trial is right; one wrong trial
    decides "not solvable"; otherwise a trial that could not be decided leaves it open."""
    if any(t.outcome != "failed" and not t.correct for t in trials):
        return "not solvable"
    if any(t.outcome == "failed" for t in trials):
        return "incomplete"
    return "solvable"


# ---------------------------------------------------------------- probing


@dataclass
class _CallTally:
    """This invocation's calls, counted as the engine records them (the report's "calls");
    probe calls also move the progress bar, one trial each."""

    planned_trials: int
    on_progress: Callable[[int, int], None] | None = None
    trials: int = 0
    cost_usd: float = 0.0
    by_step: dict[str, dict[str, int]] = field(default_factory=dict)

    def add(self, record: CallRecord) -> None:
        entry = self.by_step.setdefault(record.step, {"paid": 0, "cached": 0, "failed": 0})
        if record.cache_hit:
            entry["cached"] += 1
        elif record.outcome == "error":
            entry["failed"] += 1
        else:
            entry["paid"] += 1
            self.cost_usd += record.cost_usd
        if record.step == PROBE_STEP and self.on_progress is not None:
            self.trials += 1
            self.on_progress(self.trials, max(self.trials, self.planned_trials))

    def summary(self) -> dict[str, Any]:
        steps = self.by_step.values()
        return {
            "paid": sum(entry["paid"] for entry in steps),
            "cached": sum(entry["cached"] for entry in steps),
            "failed": sum(entry["failed"] for entry in steps),
            "cost_usd": round(self.cost_usd, 6),
            "by_step": dict(sorted(self.by_step.items())),
        }


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
    models, judge) are raised before any call is paid for, and a probe model that does not
    answer stops the probe there too (``vkr_core.preflight.PreflightError``); a video that
    cannot be decoded only makes its questions "unprobed". A second probe on the same
    ``out_dir`` while one runs is refused.
    """
    from vkr_core.plugins import get_plugin_manager
    from vkr_core.run import run_items

    options = options or ProbeOptions()
    options.check()
    items = load_eval_set(eval_file)
    root = Path(videos_root)
    if not root.is_dir():
        raise InputError(f"videos root is not a folder: {root}")
    config = options.config(root)
    pm = pm or get_plugin_manager()
    pool = pool if isinstance(pool, Pool) else load_pool(pool)

    skipped = [
        item
        for item in items
        if item.question.problem_type == "open-ended" and options.judge is None
    ]
    skipped_ids = {item.question.id for item in skipped}
    files = {
        item.question.video_path: _video_file(root, item.question.video_path) for item in items
    }
    missing = [path for path in files.values() if not path.is_file()]
    if len(missing) == len(files):
        raise InputError(
            f"none of the {len(files)} video(s) of the eval file is under {root} "
            f"(first: {missing[0]}): is --videos-root right?"
        )
    videos: dict[str, ProbeVideo] = {}
    for item in items:
        question = item.question
        if question.id in skipped_ids:
            continue
        video = videos.get(question.video_path)
        if video is None:
            videos[question.video_path] = ProbeVideo(
                item_id=video_key(question.video_path),
                video_path=question.video_path,
                path=str(files[question.video_path]),
                questions=[question],
            )
        else:
            video.questions.append(question)

    out = Path(out_dir)
    model_count = len(options.models) if options.models else DEFAULT_MODEL_COUNT
    calls = _CallTally(
        planned_trials=sum(len(v.questions) for v in videos.values())
        * model_count
        * options.trials,
        on_progress=on_progress,
    )
    # force: each probe rebuilds every record of its eval set from the call cache, so one
    # directory may hold probes of other settings (as it always could).
    await run_items(
        list(videos.values()),
        out,
        pool,
        config,
        pm,
        force=True,
        concurrency=options.concurrency,
        progress=False,
        on_call=calls.add,
    )
    store = RunStore(out)
    models, judge = _chosen_models(store)
    records = {video.item_id: _read_record(store, video.item_id) for video in videos.values()}
    probed = {
        (row.id, row.model): row
        for record in records.values()
        if record is not None
        for row in record.probes
    }

    # The rows in eval-file order, whatever order the videos finished in.
    unprobed: dict[str, str] = {}
    rows: list[ModelProbe] = []
    for item in items:
        question = item.question
        if question.id in skipped_ids:
            continue
        record = records[video_key(question.video_path)]
        mine = [probed.get((question.id, name)) for name in models]
        if record is not None and record.status == "failed":
            unprobed[question.id] = f"video not probed: {record.failure}"
        elif record is None or any(row is None for row in mine):
            # Only a run stopped early leaves these; they are probed by the next one.
            unprobed[question.id] = "not probed: the probe stopped before its trials"
        else:
            rows.extend(row for row in mine if row is not None)
    failed_videos = sum(1 for r in records.values() if r is not None and r.status == "failed")
    fate = _fates(items, rows, skipped_ids, unprobed)
    report = _build_report(
        items,
        rows,
        fate,
        models,
        judge,
        skipped,
        unprobed,
        failed_videos,
        calls.summary(),
        options,
        eval_file,
        root,
    )
    step = pm.registry.get("step", PROBE_STEP)
    report["step_version"] = step.version()
    if judge is not None:
        report["judge_version"] = step.judge.version()
    paths = _write_outputs(out, items, rows, report, skipped, unprobed)
    return ProbeResult(report, paths)


def _chosen_models(store: RunStore) -> tuple[list[str], str | None]:
    """The probe models and judge this probe ran with, as its run directory recorded them."""
    config = store.layout.read_config()
    if config is None or not isinstance(config.get("pipeline"), dict):
        raise InputError(
            f"{store.layout.config} does not record the probe's models: "
            "was this run directory made by `vkr probe`?"
        )
    chosen = config["pipeline"]
    return list(chosen["models"]), chosen["judge"]


def _read_record(store: RunStore, item_id: str) -> ProbeRecord | None:
    path = store.record_path(item_id)
    if not path.exists():
        return None
    return ProbeRecord.model_validate_json(path.read_text())


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
    names: list[str],
    judge: str | None,
    skipped: list[EvalItem],
    unprobed: dict[str, str],
    failed_videos: int,
    calls: dict[str, Any],
    options: ProbeOptions,
    eval_file: str | Path,
    root: Path,
) -> dict[str, Any]:
    """report.json: rates per model and per (dataset, model), counts, notes and calls."""

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
    if failed_videos:
        notes.append(
            f"{failed_videos} video(s) could not be decoded or found: their questions are "
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
        "judge": judge,
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
        "calls": calls,
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
