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
import re
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from vkr_core.schemas import SKILLS, CallRecord, InputError, VideoRecord

REPORT_VERSION = 1
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


def _read_records(root: Path, warnings: list[str]) -> list[VideoRecord]:
    records = []
    for path in sorted((root / "records").glob("*.json")):
        try:
            records.append(VideoRecord.model_validate_json(path.read_text()))
        except ValidationError as exc:
            error = exc.errors()[0]
            field = ".".join(str(x) for x in error["loc"]) or "(file)"
            warnings.append(f"skipped unreadable record {path}: {field}: {error['msg']}")
        except (OSError, UnicodeDecodeError) as exc:
            warnings.append(f"skipped unreadable record {path}: {exc}")
    return records


def _read_jsonl(path: Path, warnings: list[str]) -> list[tuple[int, dict[str, Any]]]:
    """Lines of a jsonl log; a line cut short by a killed run is skipped with a warning."""
    if not path.exists():
        return []
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            data = json.loads(line)
        except json.JSONDecodeError:
            warnings.append(f"skipped unreadable line {number} of {path}")
            continue
        if isinstance(data, dict):
            rows.append((number, data))
        else:
            warnings.append(f"skipped line {number} of {path}: not a JSON object")
    return rows


def _read_calls(root: Path, warnings: list[str]) -> list[CallRecord]:
    path = root / "calls.jsonl"
    if not path.exists():
        return []
    calls = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            # Straight from JSON text: about twice as fast as json.loads then validate.
            calls.append(CallRecord.model_validate_json(line))
        except ValidationError as exc:
            error = exc.errors()[0]
            if error["type"] == "json_invalid":
                warnings.append(f"skipped unreadable line {number} of {path}")
            else:
                field = ".".join(str(x) for x in error["loc"]) or "(line)"
                warnings.append(f"skipped line {number} of {path}: bad call record ({field})")
    return calls


def _failures(root: Path, records: list[VideoRecord], warnings: list[str]) -> list[dict[str, Any]]:
    """The latest failure of each video that has not succeeded since."""
    done = {r.video_id for r in records if r.status == "done"}
    latest: dict[str, dict[str, Any]] = {}
    attempts: Counter[str] = Counter()
    path = root / "failures.jsonl"
    for number, data in _read_jsonl(path, warnings):
        video_id = data.get("video_id")
        if not isinstance(video_id, str):
            warnings.append(f"skipped line {number} of {path}: no video_id")
            continue
        attempts[video_id] += 1
        when = data.get("time")
        at = float(when) if isinstance(when, (int, float)) else None
        entry: dict[str, Any] = {
            "video_id": video_id,
            "path": data.get("path"),
            "reason": str(data.get("reason") or ""),
            "time": at,
        }
        previous = latest.get(video_id)
        # Appended in time order; the recorded time only decides between reordered lines.
        if previous is None or (at or 0.0) >= (previous["time"] or 0.0):
            latest[video_id] = entry
    # A failed record without a log line (log lost or written by an older version) still counts.
    for record in records:
        if record.status == "failed" and record.video_id not in latest:
            latest[record.video_id] = {
                "video_id": record.video_id,
                "path": record.video.path,
                "reason": record.failure or "",
                "time": None,
            }
            attempts[record.video_id] += 1
    rows = []
    for video_id in sorted(latest):
        if video_id in done:
            continue
        rows.append({**latest[video_id], "attempts": attempts[video_id]})
    return rows


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


def _gate_order(records: list[VideoRecord], known: Sequence[str] | None) -> list[str]:
    # Distinct sequences only, in first-seen order: a big run repeats the same few paths.
    sequences: dict[tuple[str, ...], None] = {}
    for record in records:
        for example in record.accepted:
            sequences[tuple(v.step for v in example.verdicts)] = None
        for rejection in record.rejected:
            if rejection.step == GENERATOR:
                continue
            passed = [v.step for v in rejection.candidate.verdicts] if rejection.candidate else []
            if not passed or passed[-1] != rejection.step:
                passed.append(rejection.step)
            sequences[tuple(passed)] = None
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


def funnel_rows(outcomes: list[str | None], gates: list[str]) -> list[dict[str, Any]]:
    """Stages from per-round outcomes: None = accepted, NO_OUTCOME = none yet, else the step
    that rejected it. The "with an outcome" stage appears only when some round has none."""
    rejected_at = Counter(o for o in outcomes if o is not None)
    rounds = len(outcomes)
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
    if rejected_at[NO_OUTCOME]:
        stages.insert(0, ("with an outcome", NO_OUTCOME))
    remaining = rounds
    for stage, step in stages:
        before = remaining
        remaining -= rejected_at[step]
        rows.append(
            {
                "stage": stage,
                "step": step,
                "count": remaining,
                "rejected": rejected_at[step],
                "kept_share": _share(remaining, before),
                "share_of_rounds": _share(remaining, rounds),
            }
        )
    accepted = sum(1 for o in outcomes if o is None)
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
    known = [s for s in SKILLS if s in skills]
    return known + sorted(set(skills) - set(SKILLS))


def funnels(records: Iterable[VideoRecord], gates: list[str]) -> dict[str, Any]:
    """The funnel overall and per skill; planned rounds without an outcome count as such."""
    by_skill: dict[str, list[str | None]] = defaultdict(list)
    everything: list[str | None] = []
    for record in records:
        for example in record.accepted:
            by_skill[example.skill].append(None)
            everything.append(None)
        for rejection in record.rejected:
            by_skill[rejection.skill].append(rejection.step)
            everything.append(rejection.step)
        for skill, missing in record.missing_rounds().items():
            by_skill[skill] += [NO_OUTCOME] * missing
            everything += [NO_OUTCOME] * missing
    return {
        "overall": funnel_rows(everything, gates),
        "by_skill": {s: funnel_rows(by_skill[s], gates) for s in _skill_order(by_skill)},
    }


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
    text = _SPACES.sub(" ", reason).strip()
    text = _QUOTED.sub("'…'", text)
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


def _rejections(
    records: list[VideoRecord], steps: list[str], models: set[str]
) -> dict[str, dict[str, Any]]:
    pattern = _names_pattern(models)
    by_step: dict[str, list[tuple[str, Any]]] = defaultdict(list)
    for record in records:
        for rejection in record.rejected:
            by_step[rejection.step].append((normalise_reason(rejection.reason, pattern), rejection))
    out: dict[str, dict[str, Any]] = {}
    for step in merge_orders([steps, sorted(by_step)]):
        if step not in by_step:
            continue
        mapping = collapse_free_text(Counter(key for key, _ in by_step[step]))
        grouped: dict[str, dict[str, Any]] = {}
        kinds: Counter[str] = Counter()
        for key, rejection in by_step[step]:
            reason = mapping[key]
            group = grouped.setdefault(
                reason, {"reason": reason, "count": 0, "kinds": Counter(), "examples": []}
            )
            group["count"] += 1
            group["kinds"][rejection.kind] += 1
            kinds[rejection.kind] += 1
            if len(group["examples"]) < EXAMPLES_PER_REASON and (
                rejection.reason not in group["examples"]
            ):
                group["examples"].append(rejection.reason)
        groups = sorted(grouped.values(), key=lambda g: (-g["count"], g["reason"]))
        for group in groups:
            group["kinds"] = dict(sorted(group["kinds"].items()))
        out[step] = {
            "total": sum(g["count"] for g in groups),
            "kinds": dict(sorted(kinds.items())),
            "distinct_reasons": len(groups),
            "reasons": groups[:TOP_REASONS],
            "other": sum(g["count"] for g in groups[TOP_REASONS:]),
        }
    return out


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
        self.prompt_tokens = self.completion_tokens = 0
        self.spend = self.saved = 0.0
        self.outcomes: Counter[str] = Counter()
        self.latencies: list[float] = []

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
            self.prompt_tokens += call.prompt_tokens
            self.completion_tokens += call.completion_tokens
            self.latencies.append(call.latency_s)

    def result(self) -> dict[str, Any]:
        return {
            "calls": self.calls,
            "paid_calls": self.paid,
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


def _call_stats(
    calls: list[CallRecord], steps: Sequence[str]
) -> tuple[dict[str, Any], dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    """Totals, per model and per step (steps in pipeline order, then any others)."""
    total = _CallTally()
    models: dict[str, _CallTally] = defaultdict(_CallTally)
    by_step: dict[str, _CallTally] = defaultdict(_CallTally)
    for call in calls:
        total.add(call)
        models[call.model].add(call)
        by_step[call.step].add(call)
    step_order = [s for s in merge_orders([steps, sorted(by_step)]) if s in by_step]
    return (
        total.result(),
        {name: models[name].result() for name in sorted(models)},
        {name: by_step[name].result() for name in step_order},
    )


# ---------------------------------------------------------------- the report


def build_report(run_dir: str | Path, gate_names: Sequence[str] | None = None) -> dict[str, Any]:
    """Read a run directory and summarise it (the content of ``report.json``).

    ``gate_names`` is a known gate order (the plugin registry's); without it the order is
    read from the records.
    """
    root = Path(run_dir)
    if not root.is_dir():
        raise InputError(f"run directory {root} does not exist or is not a directory")
    if not any((root / name).exists() for name in ("records", "calls.jsonl", "failures.jsonl")):
        raise InputError(
            f"{root} is not a vkr run directory: it has no records/, calls.jsonl or "
            "failures.jsonl (pass the --out folder of `vkr generate`)"
        )
    with _collector_paused():
        return _summarise(root, gate_names)


def _summarise(root: Path, gate_names: Sequence[str] | None) -> dict[str, Any]:
    warnings: list[str] = []
    records = _read_records(root, warnings)
    calls = _read_calls(root, warnings)
    failures = _failures(root, records, warnings)
    gates = _gate_order(records, gate_names)
    funnel = funnels(records, gates)

    models: set[str] = {c.model for c in calls}
    for record in records:
        for example in record.accepted:
            models.update(m for ms in example.models.values() for m in ms)
        for rejection in record.rejected:
            if rejection.candidate:
                models.update(m for ms in rejection.candidate.models.values() for m in ms)
    steps = [GENERATOR, *gates]

    totals, per_model, per_step = _call_stats(calls, steps)
    accepted = funnel["overall"][-1]["count"]
    rounds = funnel["overall"][0]["count"]
    done = sum(1 for r in records if r.status == "done" and r.finished)
    unfinished = sorted(r.video_id for r in records if not r.finished)
    report: dict[str, Any] = {
        "report_version": REPORT_VERSION,
        "run_dir": str(root.resolve()),
        "gates": gates,
        "totals": {
            "videos": len(
                {r.video_id for r in records if r.status == "done"}
                | {f["video_id"] for f in failures}
                | set(unfinished)
            ),
            "videos_done": done,
            "videos_failed": len(failures),
            # Started and not finished: a stopped run; the same command finishes them.
            "videos_unfinished": len(unfinished),
            "frames": sum(r.frames for r in records),
            "rounds": rounds,
            "accepted": accepted,
            "acceptance_rate": _share(accepted, rounds),
            "cost_per_accepted_usd": totals["spend_usd"] / accepted if accepted else None,
            **totals,
        },
        "funnel": funnel,
        "rejections": _rejections(records, steps, models),
        "models": per_model,
        "steps": per_step,
        "failures": failures,
        "unfinished": unfinished,
        "warnings": warnings,
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
    return [
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
    out.parent.mkdir(parents=True, exist_ok=True)
    image.save(out, format="PNG", optimize=True)
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
    """Write report.json, report.md, report.html and report.png; returns their paths."""
    from vkr_core.store import atomic_write

    folder = Path(out_dir)
    if folder.exists() and not folder.is_dir():
        raise InputError(f"report output {folder} exists and is not a directory")
    folder.mkdir(parents=True, exist_ok=True)
    paths = {
        "json": folder / "report.json",
        "md": folder / "report.md",
        "html": folder / "report.html",
        "png": folder / "report.png",
    }
    atomic_write(paths["json"], json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    atomic_write(paths["md"], report_markdown(report))
    atomic_write(paths["html"], report_html(report))
    report_png(report, paths["png"])
    return paths
