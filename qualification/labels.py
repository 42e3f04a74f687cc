"""labels.sqlite: every label ever given, one current label per (item, annotator).

A changed label never replaces a row: the new row is inserted and the old one points at it
(``superseded_by``), so the history of every judgement is kept and can be audited.
"""

from __future__ import annotations

import sqlite3
import threading
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from qualification.models import AUTO_ANNOTATOR, CATEGORIES, LABELS, Label
from vkr_core.schemas import InputError

_SCHEMA = """
CREATE TABLE IF NOT EXISTS pilot (pilot_id TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS labels (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    item_id TEXT NOT NULL,
    annotator TEXT NOT NULL,
    label TEXT NOT NULL CHECK (label IN ('ok', 'hard', 'soft')),
    category TEXT,
    note TEXT NOT NULL DEFAULT '',
    created_at TEXT NOT NULL,
    source TEXT NOT NULL,
    superseded_by INTEGER REFERENCES labels(id)
);
CREATE UNIQUE INDEX IF NOT EXISTS one_current_label
    ON labels (item_id, annotator) WHERE superseded_by IS NULL;
"""

MAX_ANNOTATOR_LENGTH = 64
MAX_NOTE_LENGTH = 4000


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def check_annotator(name: str, allow_auto: bool = False) -> str:
    """The annotator name, stripped, or InputError saying what is wrong with it."""
    cleaned = (name or "").strip()
    if not cleaned:
        raise InputError("an annotator name is required (who gave this label?)")
    if len(cleaned) > MAX_ANNOTATOR_LENGTH:
        raise InputError(f"annotator name {cleaned[:20]!r}... is longer than 64 characters")
    if cleaned == AUTO_ANNOTATOR and not allow_auto:
        raise InputError(
            f"annotator name {AUTO_ANNOTATOR!r} is reserved for labels vkr sets itself"
        )
    return cleaned


def check_label(label: str, category: str | None, note: str) -> tuple[str, str | None, str]:
    if label not in LABELS:
        raise InputError(f"label {label!r} is not one of {', '.join(LABELS)}")
    category = category or None
    if category is not None and category not in CATEGORIES:
        raise InputError(f"category {category!r} is not one of {', '.join(CATEGORIES)}")
    if label == "ok" and category is not None:
        raise InputError(f"an ok label has no failure category (got {category!r})")
    if len(note) > MAX_NOTE_LENGTH:
        raise InputError(f"the note is longer than {MAX_NOTE_LENGTH} characters")
    return label, category, note


@dataclass
class LabelChange:
    status: Literal["created", "changed", "unchanged"]
    label: Label
    previous: Label | None


class LabelStore:
    """The labels of one pilot. Safe to share between the threads of one process."""

    def __init__(self, path: str | Path, pilot_id: str):
        self.path = Path(path)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA busy_timeout=5000")
        self._db.executescript(_SCHEMA)
        row = self._db.execute("SELECT pilot_id FROM pilot").fetchone()
        if row is None:
            self._db.execute("INSERT INTO pilot (pilot_id) VALUES (?)", (pilot_id,))
        elif row["pilot_id"] != pilot_id:
            self._db.close()
            raise InputError(
                f"{self.path} holds labels of pilot {row['pilot_id']!r}, not of {pilot_id!r}"
            )
        self.pilot_id = pilot_id

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> LabelStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @staticmethod
    def _label(row: sqlite3.Row) -> Label:
        return Label(**dict(row))

    def get(self, item_id: str, annotator: str) -> Label | None:
        """The current label of an item by an annotator, if any."""
        with self._lock:
            row = self._db.execute(
                "SELECT * FROM labels WHERE item_id = ? AND annotator = ? AND superseded_by IS NULL",
                (item_id, annotator),
            ).fetchone()
        return self._label(row) if row else None

    def current(self, annotator: str | None = None) -> list[Label]:
        """Current labels, of one annotator or of all, in item then annotator order."""
        query = "SELECT * FROM labels WHERE superseded_by IS NULL"
        args: tuple[str, ...] = ()
        if annotator is not None:
            query += " AND annotator = ?"
            args = (annotator,)
        with self._lock:
            rows = self._db.execute(query + " ORDER BY item_id, annotator", args).fetchall()
        return [self._label(r) for r in rows]

    def history(self, item_id: str, annotator: str | None = None) -> list[Label]:
        """Every label ever given to an item (by one annotator), oldest first."""
        query = "SELECT * FROM labels WHERE item_id = ?"
        args: tuple[str, ...] = (item_id,)
        if annotator is not None:
            query += " AND annotator = ?"
            args += (annotator,)
        with self._lock:
            rows = self._db.execute(query + " ORDER BY id", args).fetchall()
        return [self._label(r) for r in rows]

    def set(
        self,
        item_id: str,
        annotator: str,
        label: str,
        category: str | None = None,
        note: str = "",
        source: str = "web",
    ) -> LabelChange:
        """Make this the current label; a different current one is kept in the history."""
        annotator = check_annotator(annotator, allow_auto=source == "auto")
        label, category, note = check_label(label, category, note)
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                row = self._db.execute(
                    "SELECT * FROM labels WHERE item_id = ? AND annotator = ? "
                    "AND superseded_by IS NULL",
                    (item_id, annotator),
                ).fetchone()
                previous = self._label(row) if row else None
                if previous and (previous.label, previous.category, previous.note) == (
                    label,
                    category,
                    note,
                ):
                    self._db.execute("COMMIT")
                    return LabelChange("unchanged", previous, previous)
                # Retire the old row first: the unique index allows one current row only.
                if previous:
                    self._db.execute(
                        "UPDATE labels SET superseded_by = -1 WHERE id = ?", (previous.id,)
                    )
                cursor = self._db.execute(
                    "INSERT INTO labels (item_id, annotator, label, category, note, created_at,"
                    " source) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (item_id, annotator, label, category, note, now(), source),
                )
                new_id = cursor.lastrowid
                if previous:
                    self._db.execute(
                        "UPDATE labels SET superseded_by = ? WHERE id = ?", (new_id, previous.id)
                    )
                new_row = self._db.execute(
                    "SELECT * FROM labels WHERE id = ?", (new_id,)
                ).fetchone()
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return LabelChange("changed" if previous else "created", self._label(new_row), previous)
