"""What a run produced and what it cost: funnel, rejection reasons, spend per model and step.

Everything is read from the run directory alone (``records/``, ``calls.jsonl``,
``failures.jsonl``), so a report can be made for a run whose plugins are no longer
installed; the gate order is taken from the order verdicts appear in the records, with an
optional known order (the registry's) as a tie-breaker.

``build_report`` returns a plain dict (what ``report.json`` holds); the writers turn it into
markdown tables, a self-contained HTML page with inline SVG charts, and a PNG drawn with
Pillow.
"""

from __future__ import annotations

import contextlib
import gc
import html
import json
import math
import os
import re
import time
from array import array
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from vkr_core.errors import describe_validation_error
from vkr_core.files import JsonlProblem, atomic_path, atomic_write, read_jsonl
from vkr_core.schemas import CallRecord, InputError, VideoRecord
from vkr_core.store import RunLayout

REPORT_VERSION = 1
# The paper's skills come first in tables, in the paper's order; any other skill follows.
PAPER_SKILLS = ("VidR", "KnowVid", "KnowVidR")
GENERATOR = "example_generation"
OUTCOMES = ("ok", "malformed", "refusal", "error")
# Enough to see what dominates a step without drowning the page in one-offs.
TOP_REASONS = 10
EXAMPLES_PER_REASON = 3

__all__ = [
    "build_report",
    "normalise_reason",
    "report_html",
    "report_markdown",
    "report_png",
    "summary_renderables",
    "summary_text",
    "write_report",
]


# ---------------------------------------------------------------- reading the run directory


@contextlib.contextmanager
def _collector_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector while a report holds many small objects.

    Loading a run makes hundreds of thousands of objects and no cycles; the collector's
    repeated passes over them took about 70 % of the time on a 2,000-video run
    (bench/bench_report.py). Nothing is lost: collection resumes on exit.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _read_records(root: Path, warnings: list[str]) -> Iterator[VideoRecord]:
    """Records one at a time: a report over 100,000 videos never holds more than one."""
    folder = RunLayout(root).records
    # File names, not Path objects: the sorted list is the one thing here that grows with N.
    names = sorted(
        entry.name
        for entry in (os.scandir(folder) if folder.is_dir() else ())
        if entry.name.endswith(".json") and not entry.name.startswith(".")
    )
    for name in names:
        path = folder / name
        try:
            record = VideoRecord.model_validate_json(path.read_text())
        except ValidationError as exc:
            warnings.append(f"skipped unreadable record {path}: {describe_validation_error(exc)}")
            continue
        except (OSError, UnicodeDecodeError) as exc:
            warnings.append(f"skipped unreadable record {path}: {exc}")
            continue
        yield record


def _skipped(warnings: list[str]) -> Callable[[JsonlProblem], None]:
    """A damaged line of a run's log (a kill cuts the last one short) becomes a warning."""
    return lambda problem: warnings.append(f"skipped {problem}")


def _read_calls(root: Path, warnings: list[str]) -> Iterator[CallRecord]:
    """Call records one at a time, straight from each line of the call log."""
    for _, call in read_jsonl(
        RunLayout(root).calls, CallRecord, on_problem=_skipped(warnings), missing_ok=True
    ):
        yield call


class _Failures:
    """The latest failure of each video that has not succeeded since.

    ``failures.jsonl`` is read first (one entry per failing video); the records, fed one at a
    time, then drop the videos that are done and add failed ones the log lacks.
    """

    def __init__(self, root: Path, warnings: list[str]):
        self.latest: dict[str, dict[str, Any]] = {}
        self.attempts: Counter[str] = Counter()
        self.done: set[str] = set()
        path = RunLayout(root).failures
        skip = _skipped(warnings)
        for number, data in read_jsonl(path, on_problem=skip, missing_ok=True):
            video_id = data.get("video_id")
            if not isinstance(video_id, str):
                skip(JsonlProblem(path, number, "no video_id"))
                continue
            self.attempts[video_id] += 1
            when = data.get("time")
            at = float(when) if isinstance(when, (int, float)) else None
            entry: dict[str, Any] = {
                "video_id": video_id,
                "path": data.get("path"),
                "reason": str(data.get("reason") or ""),
                "time": at,
            }
            previous = self.latest.get(video_id)
            # Appended in time order; the recorded time only decides between reordered lines.
            if previous is None or (at or 0.0) >= (previous["time"] or 0.0):
                self.latest[video_id] = entry
        self.logged = set(self.latest)

    def add(self, record: VideoRecord) -> None:
        if record.status == "done":
            # Only ids that failed at some point are kept: the set stays as small as the log.
            if record.video_id in self.latest:
                self.done.add(record.video_id)
        elif record.status == "failed" and record.video_id not in self.logged:
            # A failed record without a log line (log lost or written by an older version).
            self.latest[record.video_id] = {
                "video_id": record.video_id,
                "path": record.video.path,
                "reason": record.failure or "",
                "time": None,
            }
            self.attempts[record.video_id] += 1

    def rows(self) -> list[dict[str, Any]]:
        return [
            {**self.latest[video_id], "attempts": self.attempts[video_id]}
            for video_id in sorted(self.latest)
            if video_id not in self.done
        ]


# ---------------------------------------------------------------- gate order


def merge_orders(sequences: Iterable[Sequence[str]]) -> list[str]:
    """One order consistent with every sequence; ties and conflicts go by first appearance."""
    first_seen: dict[str, int] = {}
    after: dict[str, set[str]] = defaultdict(set)
    for sequence in sequences:
        for name in sequence:
            first_seen.setdefault(name, len(first_seen))
        for earlier, later in zip(sequence, sequence[1:], strict=False):
            if earlier != later:
                after[earlier].add(later)
    incoming: Counter[str] = Counter()
    for laters in after.values():
        for later in laters:
            incoming[later] += 1
    remaining = sorted(first_seen, key=first_seen.__getitem__)
    order: list[str] = []
    while remaining:
        ready = [n for n in remaining if incoming[n] == 0]
        # A cycle means the records disagree (plugins changed mid-run): fall back to first seen.
        name = ready[0] if ready else remaining[0]
        remaining.remove(name)
        order.append(name)
        for later in after.get(name, ()):
            incoming[later] -= 1
    return order


def _add_gate_sequences(record: VideoRecord, sequences: dict[tuple[str, ...], None]) -> None:
    """The gate paths a record's examples took (distinct ones, in first-seen order: a big run
    repeats the same few paths, so this stays small)."""
    for example in record.accepted:
        sequences[tuple(v.step for v in example.verdicts)] = None
    for rejection in record.rejected:
        if rejection.step == GENERATOR:
            continue
        passed = [v.step for v in rejection.candidate.verdicts] if rejection.candidate else []
        if not passed or passed[-1] != rejection.step:
            passed.append(rejection.step)
        sequences[tuple(passed)] = None


def _gate_order(sequences: dict[tuple[str, ...], None], known: Sequence[str] | None) -> list[str]:
    seen = {name for sequence in sequences for name in sequence}
    ordered: list[Sequence[str]] = list(sequences)
    if known:
        # The known order only breaks ties; gates the run never reached are left out, unless
        # there is no data at all, when the known gates give the funnel its shape.
        ordered.append([g for g in known if g in seen or not seen])
    return [name for name in merge_orders(ordered) if name != GENERATOR]


# ---------------------------------------------------------------- funnel


def _share(part: float, whole: float) -> float | None:
    return part / whole if whole else None


# The outcome of a planned round that has none yet (a video stopped or still running).
NO_OUTCOME = "(no outcome)"


def funnel_rows(
    outcomes: Iterable[str | None] | Counter[str | None], gates: list[str]
) -> list[dict[str, Any]]:
    """Stages from per-round outcomes: None = accepted, NO_OUTCOME = none yet, else the step
    that rejected it; a Counter of them serves as well as a list. The "with an outcome"
    stage appears only when some round has none."""
    counts = outcomes if isinstance(outcomes, Counter) else Counter(outcomes)
    rounds = sum(counts.values())
    rows = [
        {
            "stage": "rounds",
            "step": None,
            "count": rounds,
            "rejected": 0,
            "kept_share": None,
            "share_of_rounds": _share(rounds, rounds),
        }
    ]
    stages = [("generated", GENERATOR)] + [(f"after {g}", g) for g in gates]
    if counts[NO_OUTCOME]:
        stages.insert(0, ("with an outcome", NO_OUTCOME))
    remaining = rounds
    for stage, step in stages:
        before = remaining
        remaining -= counts[step]
        rows.append(
            {
                "stage": stage,
                "step": step,
                "count": remaining,
                "rejected": counts[step],
                "kept_share": _share(remaining, before),
                "share_of_rounds": _share(remaining, rounds),
            }
        )
    accepted = counts[None]
    rows.append(
        {
            "stage": "accepted",
            "step": None,
            "count": accepted,
            "rejected": remaining - accepted,
            "kept_share": _share(accepted, remaining),
            "share_of_rounds": _share(accepted, rounds),
        }
    )
    return rows


def _skill_order(skills: Iterable[str]) -> list[str]:
    known = [s for s in PAPER_SKILLS if s in skills]
    return known + sorted(set(skills) - set(PAPER_SKILLS))


class FunnelCounts:
    """The funnel's counts, fed one record at a time: per skill, how many rounds were
    accepted (None), have no outcome yet (NO_OUTCOME) or were rejected at each step.

    A run keeps one of these instead of its records, so its memory does not grow with the
    number of videos; ``rows`` gives the funnel overall and per skill.
    """

    def __init__(self) -> None:
        self.by_skill: dict[str, Counter[str | None]] = defaultdict(Counter)

    def add(self, record: VideoRecord) -> None:
        for example in record.accepted:
            self.by_skill[example.skill][None] += 1
        for rejection in record.rejected:
            self.by_skill[rejection.skill][rejection.step] += 1
        for skill, missing in record.missing_rounds().items():
            self.by_skill[skill][NO_OUTCOME] += missing

    def rows(self, gates: list[str]) -> dict[str, Any]:
        overall: Counter[str | None] = Counter()
        for counts in self.by_skill.values():
            overall.update(counts)
        return {
            "overall": funnel_rows(overall, gates),
            "by_skill": {
                s: funnel_rows(self.by_skill[s], gates) for s in _skill_order(self.by_skill)
            },
        }


def funnels(records: Iterable[VideoRecord] | FunnelCounts, gates: list[str]) -> dict[str, Any]:
    """The funnel overall and per skill; planned rounds without an outcome count as such."""
    if isinstance(records, FunnelCounts):
        return records.rows(gates)
    counts = FunnelCounts()
    for record in records:
        counts.add(record)
    return counts.rows(gates)


# ---------------------------------------------------------------- rejection reasons

_QUOTED = re.compile(r"""(?<![\w])(['"`])(?:(?!\1).){0,200}\1(?![\w])""")
_TAG = re.compile(r"\[[a-z]{1,8}:[0-9a-fA-F]{6,}(?::[a-z]+)?\]")
_HEX = re.compile(r"\b(?=[0-9a-fA-F]*\d)[0-9a-fA-F]{8,}\b")
_NUMBER = re.compile(r"(?<![\w.])\d+(?:[.:]\d+)*(?![\w])")
_SPACES = re.compile(r"\s+")
# A label with many one-off tails ("critical unsupported step: <a sentence of the trace>")
# groups by the label: the tails are detail the raw examples keep.
FREE_TEXT_MIN_DISTINCT = 3


def _names_pattern(names: Iterable[str]) -> re.Pattern[str] | None:
    ordered = sorted({n for n in names if n}, key=len, reverse=True)
    if not ordered:
        return None
    return re.compile(r"(?<![\w-])(?:" + "|".join(map(re.escape, ordered)) + r")(?![\w-])")


def normalise_reason(reason: str, models: Iterable[str] | re.Pattern[str] | None = ()) -> str:
    """A rejection reason with its particulars (quoted answers, ids, numbers) blanked.

    ``re-solved answer 'B' differs from 'C'`` and ``... 'A' differs from 'D'`` group together.
    ``models`` are model names (or a compiled pattern of them) that become ``{model}``.
    """
    pattern = models if isinstance(models, re.Pattern) else _names_pattern(models or ())
    return _finish_reason(_start_reason(reason), pattern)


def _start_reason(reason: str) -> str:
    """The part of normalising that needs no model names (they are known only at the end)."""
    return _QUOTED.sub("'…'", _SPACES.sub(" ", reason).strip())


def _finish_reason(text: str, pattern: re.Pattern[str] | None) -> str:
    if pattern is not None:
        text = pattern.sub("{model}", text)
    text = _TAG.sub("{id}", text)
    text = _HEX.sub("{id}", text)
    return _NUMBER.sub("N", text)


def collapse_free_text(counts: Counter[str]) -> dict[str, str]:
    """Map each reason to its group: ``label: …`` where a label's tails are mostly one-offs."""
    tails: dict[str, list[str]] = defaultdict(list)
    for reason in counts:
        label, sep, _ = reason.rpartition(": ")
        if sep and label:
            tails[label].append(reason)
    mapping = {reason: reason for reason in counts}
    for label, reasons in tails.items():
        total = sum(counts[r] for r in reasons)
        if len(reasons) >= FREE_TEXT_MIN_DISTINCT and 2 * len(reasons) > total:
            for reason in reasons:
                mapping[reason] = f"{label}: …"
    return mapping


class _ReasonTally:
    """Rejections of one step, fed one at a time and kept as counters per reason.

    Reasons are grouped by their normalised text, which needs every model name of the run
    (known only once everything is read): until then they are counted under the part of the
    normalisation that needs none, with their kinds and their first few raw texts, tagged
    with the order they were seen in so the examples come out as a single pass would pick
    them.
    """

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.kinds: dict[str, Counter[str]] = defaultdict(Counter)
        self.examples: dict[str, list[tuple[int, str]]] = defaultdict(list)

    def add(self, reason: str, kind: str, seen: int) -> None:
        key = _start_reason(reason)
        self.counts[key] += 1
        self.kinds[key][kind] += 1
        examples = self.examples[key]
        if len(examples) < EXAMPLES_PER_REASON and all(raw != reason for _, raw in examples):
            examples.append((seen, reason))

    def result(self, pattern: re.Pattern[str] | None) -> dict[str, Any]:
        normalised = {key: _finish_reason(key, pattern) for key in self.counts}
        counts: Counter[str] = Counter()
        for key, count in self.counts.items():
            counts[normalised[key]] += count
        mapping = collapse_free_text(counts)
        grouped: dict[str, dict[str, Any]] = {}
        seen: dict[str, list[tuple[int, str]]] = defaultdict(list)
        kinds: Counter[str] = Counter()
        for key, count in self.counts.items():
            reason = mapping[normalised[key]]
            group = grouped.setdefault(
                reason, {"reason": reason, "count": 0, "kinds": Counter(), "examples": []}
            )
            group["count"] += count
            group["kinds"].update(self.kinds[key])
            kinds.update(self.kinds[key])
            seen[reason] += self.examples[key]
        for reason, group in grouped.items():
            # A raw text belongs to one key, so the group's first distinct texts are among
            # its keys' first ones: the earliest few of those, in the order they were seen.
            group["examples"] = [raw for _, raw in sorted(seen[reason])[:EXAMPLES_PER_REASON]]
        groups = sorted(grouped.values(), key=lambda g: (-g["count"], g["reason"]))
        for group in groups:
            group["kinds"] = dict(sorted(group["kinds"].items()))
        return {
            "total": sum(g["count"] for g in groups),
            "kinds": dict(sorted(kinds.items())),
            "distinct_reasons": len(groups),
            "reasons": groups[:TOP_REASONS],
            "other": sum(g["count"] for g in groups[TOP_REASONS:]),
        }


class _Rejections:
    """Rejection reasons per step, fed one record at a time."""

    def __init__(self) -> None:
        self.by_step: dict[str, _ReasonTally] = defaultdict(_ReasonTally)
        self.seen = 0

    def add(self, record: VideoRecord) -> None:
        for rejection in record.rejected:
            self.by_step[rejection.step].add(rejection.reason, rejection.kind, self.seen)
            self.seen += 1

    def result(self, steps: list[str], models: set[str]) -> dict[str, dict[str, Any]]:
        pattern = _names_pattern(models)
        return {
            step: self.by_step[step].result(pattern)
            for step in merge_orders([steps, sorted(self.by_step)])
            if step in self.by_step
        }


def _rejections(
    records: Iterable[VideoRecord], steps: list[str], models: set[str]
) -> dict[str, dict[str, Any]]:
    tally = _Rejections()
    for record in records:
        tally.add(record)
    return tally.result(steps, models)


# ---------------------------------------------------------------- calls and spend


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0..100) with linear interpolation, as numpy's default."""
    if not values:
        return None
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


class _CallTally:
    """Sums over call records, added one at a time (one pass serves total, models, steps)."""

    def __init__(self) -> None:
        self.calls = self.paid = self.hits = self.requests = self.retries = 0
        # Paid calls that carried the step's JSON schema: why a model's malformed count fell.
        self.structured = 0
        self.prompt_tokens = self.completion_tokens = 0
        self.spend = self.saved = 0.0
        self.outcomes: Counter[str] = Counter()
        # 8 bytes a call (a list of floats takes 32): exact percentiles at any run size.
        self.latencies = array("d")

    def add(self, call: CallRecord) -> None:
        self.calls += 1
        if call.cache_hit:
            self.hits += 1
            self.saved += call.cost_usd
            return
        self.outcomes[call.outcome] += 1
        self.requests += call.attempts
        self.retries += max(0, call.attempts - 1)
        self.spend += call.cost_usd
        # A call that ended in an error after its retries got no reply: nothing was billed.
        if call.outcome != "error":
            self.paid += 1
            self.structured += call.structured_output
            self.prompt_tokens += call.prompt_tokens
            self.completion_tokens += call.completion_tokens
            self.latencies.append(call.latency_s)

    def result(self) -> dict[str, Any]:
        return {
            "calls": self.calls,
            "paid_calls": self.paid,
            "structured_calls": self.structured,
            "cache_hits": self.hits,
            "cache_hit_rate": _share(self.hits, self.calls),
            "failed_calls": self.outcomes["error"],
            "requests": self.requests,
            "retries": self.retries,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "spend_usd": self.spend,
            "saved_usd": self.saved,
            "latency_p50_s": percentile(self.latencies, 50),
            "latency_p95_s": percentile(self.latencies, 95),
            "outcomes": {o: self.outcomes[o] for o in OUTCOMES},
        }


class _CallStats:
    """Totals, per model and per step, fed one call record at a time."""

    def __init__(self) -> None:
        self.total = _CallTally()
        self.models: dict[str, _CallTally] = defaultdict(_CallTally)
        self.by_step: dict[str, _CallTally] = defaultdict(_CallTally)

    def add(self, call: CallRecord) -> None:
        self.total.add(call)
        self.models[call.model].add(call)
        self.by_step[call.step].add(call)

    def result(
        self, steps: Sequence[str]
    ) -> tuple[dict[str, Any], dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
        """Totals, per model and per step (steps in pipeline order, then any others)."""
        step_order = [s for s in merge_orders([steps, sorted(self.by_step)]) if s in self.by_step]
        return (
            self.total.result(),
            {name: self.models[name].result() for name in sorted(self.models)},
            {name: self.by_step[name].result() for name in step_order},
        )


def _call_stats(
    calls: Iterable[CallRecord], steps: Sequence[str]
) -> tuple[dict[str, Any], dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    """Totals, per model and per step (steps in pipeline order, then any others)."""
    stats = _CallStats()
    for call in calls:
        stats.add(call)
    return stats.result(steps)


# ---------------------------------------------------------------- the report


def build_report(run_dir: str | Path, gate_names: Sequence[str] | None = None) -> dict[str, Any]:
    """Read a run directory and summarise it (the content of ``report.json``).

    ``gate_names`` is a known gate order (the plugin registry's); without it the order is
    read from the records.
    """
    root = Path(run_dir)
    if not root.is_dir():
        raise InputError(f"run directory {root} does not exist or is not a directory")
    layout = RunLayout(root)
    if not layout.looks_like_run():
        raise InputError(
            f"{root} is not a vkr run directory: it has no {layout.records.name}/, "
            f"{layout.calls.name} or {layout.failures.name} (pass the --out folder of "
            "`vkr generate`)"
        )
    with _collector_paused():
        return _summarise(root, gate_names)


def _summarise(root: Path, gate_names: Sequence[str] | None) -> dict[str, Any]:
    # One pass over the records and one over the calls, each read one at a time into
    # counters: the report's memory does not grow with the number of videos or calls.
    record_warnings: list[str] = []
    call_warnings: list[str] = []
    failure_warnings: list[str] = []
    failed = _Failures(root, failure_warnings)
    funnel_counts = FunnelCounts()
    sequences: dict[tuple[str, ...], None] = {}
    rejections = _Rejections()
    models: set[str] = set()
    frames = done = 0
    unfinished: list[str] = []
    for record in _read_records(root, record_warnings):
        failed.add(record)
        funnel_counts.add(record)
        _add_gate_sequences(record, sequences)
        rejections.add(record)
        frames += record.frames
        if not record.finished:
            unfinished.append(record.video_id)
        elif record.status == "done":
            done += 1
        for example in record.accepted:
            models.update(m for ms in example.models.values() for m in ms)
        for rejection in record.rejected:
            if rejection.candidate:
                models.update(m for ms in rejection.candidate.models.values() for m in ms)
    calls = _CallStats()
    for call in _read_calls(root, call_warnings):
        calls.add(call)
        models.add(call.model)
    failures = failed.rows()
    gates = _gate_order(sequences, gate_names)
    funnel = funnel_counts.rows(gates)
    steps = [GENERATOR, *gates]

    totals, per_model, per_step = calls.result(steps)
    accepted = funnel["overall"][-1]["count"]
    rounds = funnel["overall"][0]["count"]
    unfinished.sort()
    report: dict[str, Any] = {
        "report_version": REPORT_VERSION,
        "run_dir": str(root.resolve()),
        "gates": gates,
        "totals": {
            # Done and finished, failed, or started and not finished: each video once.
            "videos": done + len({f["video_id"] for f in failures} | set(unfinished)),
            "videos_done": done,
            "videos_failed": len(failures),
            # Started and not finished: a stopped run; the same command finishes them.
            "videos_unfinished": len(unfinished),
            "frames": frames,
            "rounds": rounds,
            "accepted": accepted,
            "acceptance_rate": _share(accepted, rounds),
            "cost_per_accepted_usd": totals["spend_usd"] / accepted if accepted else None,
            **totals,
        },
        "funnel": funnel,
        "rejections": rejections.result(steps, models),
        "models": per_model,
        "steps": per_step,
        "failures": failures,
        "unfinished": unfinished,
        "warnings": record_warnings + call_warnings + failure_warnings,
    }
    return report


# ---------------------------------------------------------------- formatting helpers


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}%"


def _usd(value: float | None) -> str:
    if value is None:
        return "–"
    if value == 0:
        return "$0"
    return f"${value:.4f}" if value >= 0.01 else f"${value:.6f}"


def _secs(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def _when(value: float | None) -> str:
    if value is None:
        return "–"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(value))


def _stage_label(row: dict[str, Any]) -> str:
    return str(row["stage"])


MODEL_COLUMNS: tuple[tuple[str, str], ...] = (
    ("calls", "calls"),
    ("paid", "paid_calls"),
    ("cache hits", "cache_hits"),
    ("tokens in", "prompt_tokens"),
    ("tokens out", "completion_tokens"),
    ("spend", "spend_usd"),
    ("p50 s", "latency_p50_s"),
    ("p95 s", "latency_p95_s"),
    ("with schema", "structured_calls"),
    ("malformed", "malformed"),
    ("refusal", "refusal"),
    ("error", "error"),
    ("retries", "retries"),
)


def _call_cells(stats: dict[str, Any]) -> list[str]:
    cells = []
    for _, key in MODEL_COLUMNS:
        if key in OUTCOMES:
            cells.append(str(stats["outcomes"][key]))
        elif key == "spend_usd":
            cells.append(_usd(stats[key]))
        elif key.startswith("latency"):
            cells.append(_secs(stats[key]))
        else:
            cells.append(str(stats[key]))
    return cells


def _videos_line(totals: dict[str, Any]) -> str:
    line = f"{totals['videos_done']} done, {totals['videos_failed']} failed"
    unfinished = totals.get("videos_unfinished")
    if unfinished:
        line += f", {unfinished} unfinished (run the same command again to finish them)"
    return line


def _headline(report: dict[str, Any]) -> list[tuple[str, str]]:
    t = report["totals"]
    lines = [
        ("videos", _videos_line(t)),
        (
            "examples",
            f"{t['accepted']} accepted of {t['rounds']} rounds ({_pct(t['acceptance_rate'])})",
        ),
        ("spend", _usd(t["spend_usd"])),
        ("cost per accepted example", _usd(t["cost_per_accepted_usd"])),
        ("model calls", f"{t['calls']} ({t['paid_calls']} paid, {t['cache_hits']} from cache)"),
        ("cache hit rate", _pct(t["cache_hit_rate"])),
        ("tokens", f"{t['prompt_tokens']} in, {t['completion_tokens']} out"),
        ("retries", str(t["retries"])),
    ]
    if t.get("structured_calls"):
        lines.insert(
            5,
            (
                "with response schema",
                f"{t['structured_calls']} of {t['paid_calls']} paid calls (structured_output)",
            ),
        )
    return lines


# ---------------------------------------------------------------- markdown


def _md_cell(value: Any) -> str:
    text = _SPACES.sub(" ", str(value)).strip()
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("<", "&lt;")


def _md_table(
    header: Sequence[str], rows: Iterable[Sequence[Any]], right: Iterable[int] | None = None
) -> str:
    """A markdown table; ``right`` are the right-aligned (numeric) columns, default all but the first."""
    numeric = set(range(1, len(header)) if right is None else right)
    align = ["---:" if i in numeric else "---" for i in range(len(header))]
    lines = ["| " + " | ".join(_md_cell(h) for h in header) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _funnel_table(overall: list[dict[str, Any]]) -> tuple[list[str], list[list[Any]]]:
    """Headers and rows of the overall funnel, for every renderer."""
    headers = ["stage", "examples", "rejected here", "kept of previous", "of rounds"]
    rows = [
        [
            _stage_label(r),
            r["count"],
            r["rejected"],
            _pct(r["kept_share"]),
            _pct(r["share_of_rounds"]),
        ]
        for r in overall
    ]
    return headers, rows


def report_markdown(report: dict[str, Any]) -> str:
    """The report as markdown tables."""
    out = [f"# vkr run report\n\nRun directory: `{report['run_dir']}`\n"]
    out.append(_md_table(["", "value"], _headline(report), right=()))
    overall = report["funnel"]["overall"]
    out.append("\n## Funnel\n")
    out.append(_md_table(*_funnel_table(overall)))
    by_skill = report["funnel"]["by_skill"]
    if by_skill:
        out.append("\n### Funnel per skill\n\nexamples (share of the skill's rounds)\n")
        rows = []
        for i, row in enumerate(overall):
            cells: list[Any] = [_stage_label(row)]
            for skill_rows in by_skill.values():
                r = skill_rows[i]
                cells.append(f"{r['count']} ({_pct(r['share_of_rounds'])})")
            rows.append(cells)
        out.append(_md_table(["stage", *by_skill], rows))
    out.append("\n## Rejection reasons\n")
    if not report["rejections"]:
        out.append("No rejections.")
    for step, info in report["rejections"].items():
        kinds = ", ".join(f"{k} {n}" for k, n in info["kinds"].items())
        out.append(f"\n### {step}: {info['total']} rejected ({kinds})\n")
        rows = [
            [g["reason"], g["count"], ", ".join(g["kinds"]), " / ".join(g["examples"])]
            for g in info["reasons"]
        ]
        if info["other"]:
            rows.append(
                [
                    f"(other {info['distinct_reasons'] - len(info['reasons'])} reasons)",
                    info["other"],
                    "",
                    "",
                ]
            )
        out.append(_md_table(["reason", "count", "kind", "examples"], rows, right=(1,)))
    for title, key, label in (("Models", "models", "model"), ("Steps", "steps", "step")):
        out.append(f"\n## {title}\n")
        rows = [[name, *_call_cells(stats)] for name, stats in report[key].items()]
        rows.append(["**total**", *_call_cells(report["totals"])])
        out.append(_md_table([label, *(h for h, _ in MODEL_COLUMNS)], rows))
    out.append("\n## Failed videos\n")
    if report["failures"]:
        out.append(
            _md_table(
                ["video", "reason", "path", "failed at", "attempts"],
                [
                    [f["video_id"], f["reason"], f["path"] or "", _when(f["time"]), f["attempts"]]
                    for f in report["failures"]
                ],
                right=(4,),
            )
        )
    else:
        out.append("None.")
    if report["warnings"]:
        out.append("\n## Warnings\n")
        out.extend(f"- {_md_cell(w)}" for w in report["warnings"])
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------- HTML with inline SVG

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:2rem;color:#1f2328;
max-width:1200px}
h1{font-size:1.5rem}h2{font-size:1.2rem;margin-top:2rem;border-bottom:1px solid #d0d7de}
h3{font-size:1rem}
table{border-collapse:collapse;margin:.5rem 0;font-size:.9rem}
th,td{border:1px solid #d0d7de;padding:.25rem .5rem;vertical-align:top}
th{background:#f6f8fa;text-align:left}td.n{text-align:right;font-variant-numeric:tabular-nums}
.charts{display:flex;flex-wrap:wrap;gap:2rem}.ex{color:#57606a;font-size:.8rem}
svg text{font-family:inherit;font-size:12px}
"""

FUNNEL_COLOUR = "#2f81f7"
COST_COLOUR = "#d4a72c"


def svg_bars(
    title: str, bars: Sequence[tuple[str, float, str]], colour: str, width: int = 560
) -> str:
    """A horizontal bar chart: one (label, value, value text) per bar."""
    label_width, value_width, bar_height, gap, top = 170, 110, 22, 6, 28
    plot = width - label_width - value_width
    height = top + len(bars) * (bar_height + gap) + 4
    biggest = max((v for _, v, _ in bars), default=0.0) or 1.0
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="{html.escape(title)}">',
        f'<text x="0" y="16" font-weight="bold">{html.escape(title)}</text>',
    ]
    for i, (label, value, text) in enumerate(bars):
        y = top + i * (bar_height + gap)
        length = max(0.0, plot * value / biggest)
        short = label if len(label) <= 26 else label[:25] + "…"
        parts.append(
            f'<text x="{label_width - 6}" y="{y + bar_height * 0.7:.1f}" text-anchor="end">'
            f"<title>{html.escape(label)}</title>{html.escape(short)}</text>"
        )
        parts.append(
            f'<rect x="{label_width}" y="{y}" width="{length:.1f}" height="{bar_height}" '
            f'fill="{colour}" rx="2"/>'
        )
        parts.append(
            f'<text x="{label_width + length + 6:.1f}" y="{y + bar_height * 0.7:.1f}">'
            f"{html.escape(text)}</text>"
        )
    parts.append("</svg>")
    return "".join(parts)


def _funnel_bars(report: dict[str, Any]) -> list[tuple[str, float, str]]:
    return [
        (_stage_label(r), float(r["count"]), f"{r['count']} ({_pct(r['share_of_rounds'])})")
        for r in report["funnel"]["overall"]
    ]


def _cost_bars(report: dict[str, Any]) -> list[tuple[str, float, str]]:
    return [
        (name, float(stats["spend_usd"]), _usd(stats["spend_usd"]))
        for name, stats in report["models"].items()
    ]


def _html_table(header: Sequence[str], rows: Iterable[Sequence[Any]], numeric_from: int = 1) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = []
    for row in rows:
        cells = "".join(
            f'<td class="n">{html.escape(str(c))}</td>'
            if i >= numeric_from
            else f"<td>{html.escape(str(c))}</td>"
            for i, c in enumerate(row)
        )
        body.append(f"<tr>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def report_html(report: dict[str, Any]) -> str:
    """The report as one self-contained HTML page (inline CSS and SVG, no scripts)."""
    esc = html.escape
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        "<title>vkr run report</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>vkr run report</h1>",
        f"<p>Run directory: <code>{esc(report['run_dir'])}</code></p>",
        _html_table(["", "value"], _headline(report), numeric_from=2),
        '<div class="charts">',
        svg_bars("Funnel: examples left after each stage", _funnel_bars(report), FUNNEL_COLOUR),
        svg_bars("Spend per model (USD, paid calls)", _cost_bars(report), COST_COLOUR),
        "</div>",
        "<h2>Funnel</h2>",
    ]
    overall = report["funnel"]["overall"]
    out.append(_html_table(*_funnel_table(overall)))
    by_skill = report["funnel"]["by_skill"]
    if by_skill:
        out.append("<h3>Per skill: examples (share of the skill's rounds)</h3>")
        rows = [
            [_stage_label(row)]
            + [f"{s[i]['count']} ({_pct(s[i]['share_of_rounds'])})" for s in by_skill.values()]
            for i, row in enumerate(overall)
        ]
        out.append(_html_table(["stage", *by_skill], rows))
    out.append("<h2>Rejection reasons</h2>")
    if not report["rejections"]:
        out.append("<p>No rejections.</p>")
    for step, info in report["rejections"].items():
        kinds = ", ".join(f"{k} {n}" for k, n in info["kinds"].items())
        out.append(f"<h3>{esc(step)}: {info['total']} rejected ({esc(kinds)})</h3>")
        body = []
        for g in info["reasons"]:
            examples = "".join(f'<div class="ex">{esc(e)}</div>' for e in g["examples"])
            body.append(
                f'<tr><td>{esc(g["reason"])}{examples}</td><td class="n">{g["count"]}</td>'
                f"<td>{esc(', '.join(g['kinds']))}</td></tr>"
            )
        if info["other"]:
            body.append(
                f"<tr><td>(other {info['distinct_reasons'] - len(info['reasons'])} reasons)"
                f'</td><td class="n">{info["other"]}</td><td></td></tr>'
            )
        out.append(
            "<table><thead><tr><th>reason (raw examples below)</th><th>count</th><th>kind</th>"
            f"</tr></thead><tbody>{''.join(body)}</tbody></table>"
        )
    for title, key, label in (("Models", "models", "model"), ("Steps", "steps", "step")):
        out.append(f"<h2>{title}</h2>")
        rows = [[name, *_call_cells(stats)] for name, stats in report[key].items()]
        rows.append(["total", *_call_cells(report["totals"])])
        out.append(_html_table([label, *(h for h, _ in MODEL_COLUMNS)], rows))
    out.append("<h2>Failed videos</h2>")
    if report["failures"]:
        out.append(
            _html_table(
                ["video", "reason", "path", "failed at", "attempts"],
                [
                    [f["video_id"], f["reason"], f["path"] or "", _when(f["time"]), f["attempts"]]
                    for f in report["failures"]
                ],
                numeric_from=4,
            )
        )
    else:
        out.append("<p>None.</p>")
    if report["warnings"]:
        out.append("<h2>Warnings</h2><ul>")
        out.extend(f"<li>{esc(w)}</li>" for w in report["warnings"])
        out.append("</ul>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------- PNG with Pillow


def _font(size: int) -> Any:
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):
        # Pillow without FreeType has only the fixed bitmap font.
        return ImageFont.load_default()


# Pillow's built-in font has no dash or ellipsis glyphs: they would draw as boxes.
_PNG_TEXT = str.maketrans({"–": "n/a", "…": "..."})


def report_png(report: dict[str, Any], path: str | Path, width: int = 1000) -> Path:
    """Draw the funnel and the spend per model as horizontal bars into a PNG."""
    from PIL import Image, ImageDraw

    panels = [
        ("Funnel: examples left after each stage", _funnel_bars(report), FUNNEL_COLOUR),
        ("Spend per model (USD, paid calls)", _cost_bars(report), COST_COLOUR),
    ]
    panels = [
        (title, [(label, value, text.translate(_PNG_TEXT)) for label, value, text in bars], colour)
        for title, bars, colour in panels
    ]
    title_font, font = _font(22), _font(16)
    margin, bar_height, gap, title_gap = 24, 26, 8, 44
    label_width, value_width = 250, 170
    plot = width - 2 * margin - label_width - value_width
    height = margin + 34
    for _, bars, _ in panels:
        height += title_gap + max(1, len(bars)) * (bar_height + gap) + margin
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    t = report["totals"]
    header = (
        f"vkr run report: {t['accepted']} accepted of {t['rounds']} rounds, "
        f"spend {_usd(t['spend_usd'])}, cache hits {_pct(t['cache_hit_rate'])}"
    )
    draw.text((margin, margin), header.translate(_PNG_TEXT), fill="#1f2328", font=title_font)
    y = margin + 34
    for title, bars, colour in panels:
        y += 12
        draw.text((margin, y), title, fill="#1f2328", font=font)
        y += title_gap - 12
        biggest = max((v for _, v, _ in bars), default=0.0) or 1.0
        if not bars:
            draw.text((margin, y + 4), "(no data)", fill="#57606a", font=font)
        for label, value, text in bars:
            short = label if len(label) <= 28 else label[:25] + "..."
            text_y = y + bar_height // 2
            draw.text(
                (margin + label_width - 10, text_y), short, fill="#1f2328", font=font, anchor="rm"
            )
            x0 = margin + label_width
            length = plot * value / biggest
            if length >= 1:
                draw.rectangle([x0, y, x0 + length, y + bar_height], fill=colour)
            draw.line([x0, y - 2, x0, y + bar_height + 2], fill="#8c959f")
            draw.text((x0 + length + 8, text_y), text, fill="#1f2328", font=font, anchor="lm")
            y += bar_height + gap
        y += margin
    out = Path(path)
    with atomic_path(out) as temporary:
        image.save(temporary, format="PNG", optimize=True)
    return out


# ---------------------------------------------------------------- text and terminal


def summary_text(report: dict[str, Any]) -> str:
    """A few lines for the end of a run: videos, funnel, spend, the top rejection reason."""
    t = report["totals"]
    stages = " -> ".join(
        f"{r['stage'].removeprefix('after ')} {r['count']}" for r in report["funnel"]["overall"]
    )
    lines = [
        f"videos: {_videos_line(t)}",
        f"funnel: {stages} ({_pct(t['acceptance_rate'])} accepted)",
        f"spend: {_usd(t['spend_usd'])}, {_usd(t['cost_per_accepted_usd'])} per accepted example; "
        f"{t['paid_calls']} paid calls, {t['cache_hits']} from cache "
        f"({_pct(t['cache_hit_rate'])} hit rate)",
    ]
    top = [
        (info["reasons"][0]["count"], step, info["reasons"][0]["reason"])
        for step, info in report["rejections"].items()
        if info["reasons"]
    ]
    if top:
        count, step, reason = max(top, key=lambda x: x[0])
        lines.append(f"top rejection: {step}: {reason} ({count})")
    if report["failures"]:
        first = report["failures"][0]
        more = len(report["failures"]) - 1
        lines.append(
            f"failed: {first['video_id']}: {first['reason']}"
            + (f" (and {more} more)" if more else "")
        )
    return "\n".join(lines)


def summary_renderables(report: dict[str, Any]) -> list[Any]:
    """Compact rich tables for a terminal: headline, funnel per skill, models."""
    from rich.table import Table

    headline = Table(show_header=False, box=None, pad_edge=False)
    headline.add_column(style="bold")
    headline.add_column()
    for name, value in _headline(report):
        headline.add_row(name, value)

    by_skill = report["funnel"]["by_skill"]
    funnel = Table(title="funnel", title_justify="left")
    funnel.add_column("stage")
    funnel.add_column("all", justify="right")
    funnel.add_column("kept", justify="right")
    for skill in by_skill:
        funnel.add_column(skill, justify="right")
    for i, row in enumerate(report["funnel"]["overall"]):
        funnel.add_row(
            _stage_label(row),
            str(row["count"]),
            _pct(row["kept_share"]),
            *(str(rows[i]["count"]) for rows in by_skill.values()),
        )

    models = Table(title="models", title_justify="left")
    columns = ("calls", "paid", "cache hits", "spend", "p50 s", "p95 s", "retries")
    models.add_column("model")
    for header in columns:
        models.add_column(header, justify="right")
    wanted = [i for i, (h, _) in enumerate(MODEL_COLUMNS) if h in columns]
    for name, stats in report["models"].items():
        cells = _call_cells(stats)
        models.add_row(name, *(cells[i] for i in wanted))
    cells = _call_cells(report["totals"])
    models.add_row("total", *(cells[i] for i in wanted), style="bold")

    out: list[Any] = [headline, funnel, models]
    if report["rejections"]:
        reasons = Table(title="top rejection reasons", title_justify="left")
        reasons.add_column("step")
        reasons.add_column("reason", overflow="fold")
        reasons.add_column("count", justify="right")
        for step, info in report["rejections"].items():
            for group in info["reasons"][:2]:
                reasons.add_row(step, group["reason"], str(group["count"]))
        out.append(reasons)
    if report["failures"]:
        failed = Table(title="failed videos", title_justify="left")
        failed.add_column("video")
        failed.add_column("reason", overflow="fold")
        for f in report["failures"]:
            failed.add_row(f["video_id"], f["reason"])
        out.append(failed)
    return out


def write_report(report: dict[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """Write the report as JSON, markdown, HTML and PNG into ``out_dir`` (a run directory's
    report files, see RunLayout.report); returns their paths."""
    folder = Path(out_dir)
    if folder.exists() and not folder.is_dir():
        raise InputError(f"report output {folder} exists and is not a directory")
    folder.mkdir(parents=True, exist_ok=True)
    paths = {kind: RunLayout(folder).report(kind) for kind in ("json", "md", "html", "png")}
    atomic_write(paths["json"], json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    atomic_write(paths["md"], report_markdown(report))
    atomic_write(paths["html"], report_html(report))
    report_png(report, paths["png"])
    return paths
