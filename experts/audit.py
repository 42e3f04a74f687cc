"""The corpus audit: a stratified sample of accepted examples, experts' labels, rates, drops.

An audit folder holds ``audit.json`` (what was sampled from where), ``sample.jsonl`` (one
example per line with its frames), ``labels.sqlite`` (every label ever given, history kept)
and, after scoring, ``score.json`` and ``score.md``. Examples are read with the same reader
`vkr split` and `vkr export` use (``corpus.exporters.load_accepted`` / ``load_split``).
"""

from __future__ import annotations

import json
import math
import random
import sqlite3
import threading
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from corpus.exporters import load_accepted, load_split
from vkr_core.files import atomic_write, read_jsonl
from vkr_core.schemas import AcceptedExample, Frame, InputError, SplitManifest
from vkr_core.store import RunLayout, SplitLayout

LABELS: tuple[str, ...] = ("ok", "not_grounded", "trace_error", "unsupported_step")
LABEL_NAMES = {
    "ok": "ok",
    "not_grounded": "not visually grounded",
    "trace_error": "trace error that changes the answer",
    "unsupported_step": "unsupported step",
}
# A handful per stratum so a rare skill or model still gets an estimate, as the paper's
# audit reports every skill.
MIN_PER_STRATUM = 3
Z95 = 1.959964
MAX_ANNOTATOR_LENGTH = 64
MAX_NOTE_LENGTH = 4000


class AuditFrame(BaseModel):
    model_config = ConfigDict(extra="forbid")

    sha256: str
    clock: str
    path: str


class AuditItem(BaseModel):
    """One sampled example, with the frames its run sampled from the video."""

    model_config = ConfigDict(extra="forbid")

    item_id: str
    stratum: str
    generation_model: str
    trace_model: str
    example: AcceptedExample
    frames: list[AuditFrame]


class AuditManifest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    source: str
    kind: str
    run_dirs: list[str]
    seed: int
    requested: int
    population: int
    sampled: int
    strata: dict[str, dict[str, int]]
    excluded_unfinished: list[str] = []


class AuditLayout:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.manifest = self.root / "audit.json"
        self.sample = self.root / "sample.jsonl"
        self.labels = self.root / "labels.sqlite"
        self.score_json = self.root / "score.json"
        self.score_md = self.root / "score.md"
        self.dropped = self.root / "dropped.json"


def _first(models: dict[str, list[str]], *steps: str) -> str:
    for step in steps:
        if models.get(step):
            return models[step][0]
    return "unknown"


def generation_model(example: AcceptedExample) -> str:
    return _first(example.models, "example_generation")


def trace_model(example: AcceptedExample) -> str:
    """The model whose reasoning is the example's trace: self_consistency re-derives it."""
    return _first(example.models, "self_consistency", "example_generation")


def stratum_of(example: AcceptedExample) -> str:
    return f"{example.skill} | {generation_model(example)}"


def allocate(sizes: dict[str, int], n: int, minimum: int = MIN_PER_STRATUM) -> dict[str, int]:
    """How many to take from each stratum: ``minimum`` each (or all of a smaller one), the
    rest proportional to size by largest remainder; all of everything when n covers it."""
    total = sum(sizes.values())
    if n >= total:
        return dict(sizes)
    if n < 1:
        raise InputError(f"--n must be at least 1, not {n}")
    keys = sorted(sizes)
    floor = min(minimum, n // max(len(keys), 1))
    take = {k: min(floor, sizes[k]) for k in keys}
    left = n - sum(take.values())
    rest = {k: sizes[k] - take[k] for k in keys}
    pool = sum(rest.values())
    if left > 0 and pool > 0:
        quotas = {k: left * rest[k] / pool for k in keys}
        extra = {k: min(rest[k], math.floor(quotas[k])) for k in keys}
        short = left - sum(extra.values())
        by_remainder = sorted(keys, key=lambda k: (-(quotas[k] - math.floor(quotas[k])), k))
        for k in by_remainder * 2:
            if short <= 0:
                break
            if extra[k] < rest[k]:
                extra[k] += 1
                short -= 1
        for k in keys:
            take[k] += extra[k]
    return take


def stratified_sample(
    examples: Sequence[AcceptedExample], n: int, seed: int
) -> tuple[list[AcceptedExample], dict[str, dict[str, int]]]:
    """A seeded stratified sample by (skill, generation model), in a seeded order."""
    strata: dict[str, list[AcceptedExample]] = defaultdict(list)
    for example in sorted(examples, key=lambda e: e.problem_id):
        strata[stratum_of(example)].append(example)
    take = allocate({k: len(v) for k, v in strata.items()}, n)
    rng = random.Random(seed)
    chosen: list[AcceptedExample] = []
    for key in sorted(strata):
        members = list(strata[key])
        rng.shuffle(members)
        chosen += members[: take[key]]
    rng.shuffle(chosen)
    table = {k: {"population": len(strata[k]), "sampled": take[k]} for k in sorted(strata)}
    return chosen, table


def _frames_of(run_dirs: Sequence[Path], video_id: str) -> list[AuditFrame]:
    for run_dir in run_dirs:
        folder = RunLayout(run_dir).frames(video_id)
        manifest = folder / "manifest.json"
        if not manifest.is_file():
            continue
        try:
            frames = [Frame.model_validate(f) for f in json.loads(manifest.read_text())["frames"]]
        except (OSError, ValueError, KeyError, TypeError):
            raise InputError(f"{manifest} is not a frame manifest vkr wrote") from None
        return [
            AuditFrame(sha256=f.sha256, clock=f.clock, path=str((folder / f.path).resolve()))
            for f in frames
        ]
    return []


def _load_source(source: Path) -> tuple[str, list[Path], list[AcceptedExample], list[str]]:
    """(kind, run dirs, accepted examples, excluded unfinished) of a run or a split folder."""
    if not source.is_dir():
        raise InputError(f"{source} is not a folder: give a run directory or a split folder")
    excluded: list[str] = []
    if SplitLayout(source).manifest.is_file():
        data = load_split(source)
        manifest = SplitManifest.model_validate_json(SplitLayout(source).manifest.read_text())
        run_dirs = [Path(d) for d in manifest.run_dirs]
        missing = [str(d) for d in run_dirs if not d.is_dir()]
        if missing:
            raise InputError(
                f"split {source} was made from {missing[0]}, which is not here: the audit "
                "shows each example's frames and trace from its run directory"
            )
        wanted = {e.problem_id for e in data.sft} | {e.problem_id for e in data.rl}
        examples = [e for e in load_accepted(run_dirs, True, []) if e.problem_id in wanted]
        return "split", run_dirs, examples, excluded
    if RunLayout(source).records.is_dir():
        return "run", [source], load_accepted([source], True, excluded), excluded
    raise InputError(
        f"{source} is neither a run directory ({RunLayout(source).records.name}/) nor a split "
        f"({SplitLayout(source).manifest.name})"
    )


def create_audit(source: str | Path, out: str | Path, n: int = 800, seed: int = 0) -> AuditManifest:
    """Sample ``n`` accepted examples of a run or split into the audit folder ``out``."""
    source = Path(source)
    layout = AuditLayout(out)
    if layout.sample.exists():
        raise InputError(
            f"{layout.root} already holds an audit (sample.jsonl): its labels refer to that "
            "sample; choose another --out"
        )
    kind, run_dirs, examples, excluded = _load_source(source)
    if not examples:
        raise InputError(f"{source} has no accepted examples to audit")
    chosen, strata = stratified_sample(examples, n, seed)
    items = [
        AuditItem(
            item_id=e.problem_id,
            stratum=stratum_of(e),
            generation_model=generation_model(e),
            trace_model=trace_model(e),
            example=e,
            frames=_frames_of(run_dirs, e.video_id),
        )
        for e in chosen
    ]
    manifest = AuditManifest(
        source=str(source),
        kind=kind,
        run_dirs=[str(d) for d in run_dirs],
        seed=seed,
        requested=n,
        population=len(examples),
        sampled=len(items),
        strata=strata,
        excluded_unfinished=excluded,
    )
    layout.root.mkdir(parents=True, exist_ok=True)
    atomic_write(layout.sample, "".join(i.model_dump_json() + "\n" for i in items))
    atomic_write(layout.manifest, manifest.model_dump_json(indent=1) + "\n")
    return manifest


def load_audit(root: str | Path) -> tuple[AuditManifest, list[AuditItem]]:
    layout = AuditLayout(root)
    if not layout.manifest.is_file() or not layout.sample.is_file():
        raise InputError(f"{root} is not an audit folder: make one with `vkr audit RUN_DIR --out`")
    manifest = AuditManifest.model_validate_json(layout.manifest.read_text())
    return manifest, [item for _, item in read_jsonl(layout.sample, AuditItem)]


# ---------------------------------------------------------------- labels

_SCHEMA = """
CREATE TABLE IF NOT EXISTS labels (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    item_id TEXT NOT NULL,
    annotator TEXT NOT NULL,
    label TEXT NOT NULL CHECK (label IN ('ok', 'not_grounded', 'trace_error', 'unsupported_step')),
    note TEXT NOT NULL DEFAULT '',
    created_at TEXT NOT NULL,
    source TEXT NOT NULL,
    superseded_by INTEGER REFERENCES labels(id)
);
CREATE UNIQUE INDEX IF NOT EXISTS one_current_label
    ON labels (item_id, annotator) WHERE superseded_by IS NULL;
"""


def check_annotator(name: str) -> str:
    cleaned = (name or "").strip()
    if not cleaned:
        raise InputError("an annotator name is required (who gave this label?)")
    if len(cleaned) > MAX_ANNOTATOR_LENGTH:
        raise InputError(f"annotator name {cleaned[:20]!r}... is longer than 64 characters")
    return cleaned


class AuditLabels:
    """labels.sqlite of an audit: a changed label is a new row, the old one points at it."""

    def __init__(self, path: str | Path):
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA busy_timeout=5000")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> AuditLabels:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def current(self, annotator: str | None = None) -> list[dict[str, Any]]:
        query = "SELECT * FROM labels WHERE superseded_by IS NULL"
        args: tuple[str, ...] = ()
        if annotator is not None:
            query += " AND annotator = ?"
            args = (annotator,)
        with self._lock:
            rows = self._db.execute(query + " ORDER BY id", args).fetchall()
        return [dict(r) for r in rows]

    def history(self, item_id: str, annotator: str | None = None) -> list[dict[str, Any]]:
        query = "SELECT * FROM labels WHERE item_id = ?"
        args: tuple[str, ...] = (item_id,)
        if annotator is not None:
            query += " AND annotator = ?"
            args += (annotator,)
        with self._lock:
            return [dict(r) for r in self._db.execute(query + " ORDER BY id", args).fetchall()]

    def set(
        self, item_id: str, annotator: str, label: str, note: str = "", source: str = "web"
    ) -> tuple[str, dict[str, Any]]:
        """Make this the current label; ("created" | "changed" | "unchanged", the row)."""
        annotator = check_annotator(annotator)
        if label not in LABELS:
            raise InputError(f"label {label!r} is not one of {', '.join(LABELS)}")
        if not isinstance(note, str) or len(note) > MAX_NOTE_LENGTH:
            raise InputError(f"the note must be text of at most {MAX_NOTE_LENGTH} characters")
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                row = self._db.execute(
                    "SELECT * FROM labels WHERE item_id = ? AND annotator = ? "
                    "AND superseded_by IS NULL",
                    (item_id, annotator),
                ).fetchone()
                if row is not None and (row["label"], row["note"]) == (label, note):
                    self._db.execute("COMMIT")
                    return "unchanged", dict(row)
                # Retire the old row first: the unique index allows one current row only.
                if row is not None:
                    self._db.execute(
                        "UPDATE labels SET superseded_by = -1 WHERE id = ?", (row["id"],)
                    )
                cursor = self._db.execute(
                    "INSERT INTO labels (item_id, annotator, label, note, created_at, source) "
                    "VALUES (?, ?, ?, ?, ?, ?)",
                    (
                        item_id,
                        annotator,
                        label,
                        note,
                        datetime.now(UTC).isoformat(timespec="milliseconds"),
                        source,
                    ),
                )
                if row is not None:
                    self._db.execute(
                        "UPDATE labels SET superseded_by = ? WHERE id = ?",
                        (cursor.lastrowid, row["id"]),
                    )
                new = self._db.execute(
                    "SELECT * FROM labels WHERE id = ?", (cursor.lastrowid,)
                ).fetchone()
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return ("changed" if row is not None else "created"), dict(new)


def item_labels(root: str | Path) -> dict[str, str]:
    """Each labelled item's verdict: its latest current label over all annotators."""
    with AuditLabels(AuditLayout(root).labels) as store:
        return {row["item_id"]: row["label"] for row in store.current()}


# ---------------------------------------------------------------- score


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of k successes in n trials (0, 0 for n = 0)."""
    if n == 0:
        return 0.0, 0.0
    p = k / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def _rates(verdicts: Iterable[str]) -> dict[str, Any]:
    counts = Counter(verdicts)
    n = sum(counts.values())
    row: dict[str, Any] = {"n": n}
    for label in LABELS:
        low, high = wilson(counts[label], n)
        row[label] = {
            "count": counts[label],
            "rate": counts[label] / n if n else 0.0,
            "low": low,
            "high": high,
        }
    return row


def score_audit(root: str | Path) -> dict[str, Any]:
    """Rates of each label with Wilson 95 % intervals, overall and per skill and model."""
    manifest, items = load_audit(root)
    verdicts = item_labels(root)
    labelled = [i for i in items if i.item_id in verdicts]
    groups: dict[str, dict[str, list[str]]] = {
        "skill": defaultdict(list),
        "generation_model": defaultdict(list),
        "trace_model": defaultdict(list),
    }
    for item in labelled:
        verdict = verdicts[item.item_id]
        groups["skill"][item.example.skill].append(verdict)
        groups["generation_model"][item.generation_model].append(verdict)
        groups["trace_model"][item.trace_model].append(verdict)
    return {
        "source": manifest.source,
        "sampled": len(items),
        "labelled": len(labelled),
        "unlabelled": len(items) - len(labelled),
        "overall": _rates(verdicts[i.item_id] for i in labelled),
        **{
            f"by_{name}": {key: _rates(values) for key, values in sorted(group.items())}
            for name, group in groups.items()
        },
    }


def _cell(rate: dict[str, Any]) -> str:
    return f"{rate['count']} ({100 * rate['rate']:.1f} %, {100 * rate['low']:.1f}–{100 * rate['high']:.1f})"


def score_markdown(score: dict[str, Any]) -> str:
    head = "| | n | " + " | ".join(LABEL_NAMES[label] for label in LABELS) + " |"
    rule = "|---" * (len(LABELS) + 2) + "|"
    lines = [
        f"# Audit of {score['source']}",
        "",
        f"{score['labelled']} of {score['sampled']} sampled examples labelled "
        f"({score['unlabelled']} not yet). Each cell: count (rate, Wilson 95 % interval).",
        "",
        head,
        rule,
        f"| **overall** | {score['overall']['n']} | "
        + " | ".join(_cell(score["overall"][label]) for label in LABELS)
        + " |",
    ]
    for name, title in (
        ("skill", "skill"),
        ("generation_model", "generation model"),
        ("trace_model", "trace model"),
    ):
        for key, row in score[f"by_{name}"].items():
            lines.append(
                f"| {title}: {key} | {row['n']} | "
                + " | ".join(_cell(row[label]) for label in LABELS)
                + " |"
            )
    return "\n".join(lines) + "\n"


def write_score(root: str | Path) -> tuple[dict[str, Any], list[Path]]:
    score = score_audit(root)
    layout = AuditLayout(root)
    atomic_write(layout.score_json, json.dumps(score, indent=1) + "\n")
    atomic_write(layout.score_md, score_markdown(score))
    return score, [layout.score_json, layout.score_md]


# ---------------------------------------------------------------- drop


def drop_flagged(root: str | Path, split_dir: str | Path) -> tuple[list[str], SplitManifest]:
    """Remove the examples labelled anything but ok from the split's files; the ids removed."""
    from corpus.split import _side

    _, items = load_audit(root)
    sampled = {i.item_id for i in items}
    flagged = {pid for pid, label in item_labels(root).items() if label != "ok" and pid in sampled}
    split = SplitLayout(split_dir)
    data = load_split(split_dir)
    manifest = SplitManifest.model_validate_json(split.manifest.read_text())
    present = {e.problem_id for e in data.sft} | {e.problem_id for e in data.rl}
    removed = sorted(flagged & present)
    sft = [e for e in data.sft if e.problem_id not in flagged]
    rl = [e for e in data.rl if e.problem_id not in flagged]
    # Rewrite only rows that stay, as the split wrote them: nothing else about a row changes.
    for path in (split.sft, split.rl):
        kept = [row for _, row in read_jsonl(path) if row.get("problem_id") not in flagged]
        atomic_write(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in kept))
    total = len(sft) + len(rl)
    manifest = manifest.model_copy(
        update={
            "sft": _side(sft, sorted({e.video_id for e in sft})),
            "rl": _side(rl, sorted({e.video_id for e in rl})),  # type: ignore[arg-type]
            "sft_share": len(sft) / total if total else 0.0,
            "open_ended_below_full_reward": [
                pid for pid in manifest.open_ended_below_full_reward if pid not in flagged
            ],
        }
    )
    atomic_write(split.manifest, manifest.model_dump_json(indent=1) + "\n")
    atomic_write(
        AuditLayout(root).dropped,
        json.dumps({"split": str(split_dir), "removed": removed}, indent=1) + "\n",
    )
    return removed, manifest
