"""The two stores every labelling page keeps in SQLite, and never overwrites.

``LabelHistory``: independent labels, one current label per (item, annotator) — the pilot's
and the audit's labels. ``DocumentHistory``: documents an annotator writes and a second one
revises or approves, one current version per document — seeds and re-annotated questions.

A change never replaces a row: the new row is inserted and the old one points at it
(``superseded_by``), so the history of every judgement and every text is kept and can be
audited. Both are safe to share between the threads of one page server (one lock), and
between processes (WAL, a busy timeout, ``BEGIN IMMEDIATE`` around each change).
"""

from __future__ import annotations

import json
import re
import sqlite3
import threading
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field

from vkr_core.schemas import InputError

# The annotator name of labels vkr sets itself (e.g. hard compliance failures): no person may
# use it, so a page or an import refuses it unless the label's source is "auto".
AUTO_ANNOTATOR = "auto"
MAX_ANNOTATOR_LENGTH = 64
MAX_NOTE_LENGTH = 4000
BUSY_TIMEOUT_MS = 5000

_IDENTIFIER = re.compile(r"^[a-z][a-z0-9_]{0,30}$")


def now() -> str:
    """The time a row is written: UTC, ISO 8601, milliseconds."""
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def check_annotator(name: str, allow_auto: bool = False) -> str:
    """The annotator name, stripped, or InputError saying what is wrong with it."""
    cleaned = (name or "").strip() if isinstance(name, str) else ""
    if not cleaned:
        raise InputError("an annotator name is required (who gave this label?)")
    if len(cleaned) > MAX_ANNOTATOR_LENGTH:
        raise InputError(
            f"annotator name {cleaned[:20]!r}... is longer than {MAX_ANNOTATOR_LENGTH} characters"
        )
    if cleaned == AUTO_ANNOTATOR and not allow_auto:
        raise InputError(
            f"annotator name {AUTO_ANNOTATOR!r} is reserved for labels vkr sets itself"
        )
    return cleaned


def _article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


def check_label(
    label: str,
    category: str | None,
    note: str,
    labels: Sequence[str],
    categories: Sequence[str] = (),
    without_category: Sequence[str] = (),
) -> tuple[str, str | None, str]:
    """(label, category or None, note), or InputError naming what is wrong."""
    if label not in labels:
        raise InputError(f"label {label!r} is not one of {', '.join(labels)}")
    category = category or None
    if category is not None:
        if not categories:
            raise InputError(f"these labels take no category (got {category!r})")
        if category not in categories:
            raise InputError(f"category {category!r} is not one of {', '.join(categories)}")
        if label in without_category:
            raise InputError(
                f"{_article(label)} {label} label has no failure category (got {category!r})"
            )
    if not isinstance(note, str):
        raise InputError("the note must be text")
    if len(note) > MAX_NOTE_LENGTH:
        raise InputError(f"the note is longer than {MAX_NOTE_LENGTH} characters")
    return label, category, note


def connect(path: str | Path) -> sqlite3.Connection:
    """A connection for one store: autocommit (changes open ``BEGIN IMMEDIATE``), WAL, and a
    busy timeout, so a second process waits for a write instead of failing."""
    db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
    db.row_factory = sqlite3.Row
    db.execute("PRAGMA journal_mode=WAL")
    db.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
    return db


class _Store:
    """One SQLite file, one lock, and the write transaction every change runs in."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._lock = threading.Lock()
        try:
            self._db = connect(self.path)
        except sqlite3.Error as exc:
            raise InputError(f"cannot open {self.path}: {exc}") from None

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """The lock and one immediate transaction: committed on success, else rolled back."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _read(self, query: str, args: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._db.execute(query, args).fetchall()


# ---------------------------------------------------------------- labels


class Label(BaseModel):
    """One judgement of one item by one annotator (or by vkr: ``AUTO_ANNOTATOR``)."""

    model_config = ConfigDict(extra="forbid")

    id: int | None = None
    item_id: str
    annotator: str
    label: str
    category: str | None = None
    note: str = ""
    created_at: str
    source: str = Field(description="web, auto, labelstudio or argilla")
    superseded_by: int | None = None


@dataclass
class LabelChange:
    status: Literal["created", "changed", "unchanged"]
    label: Label
    previous: Label | None


def _labels_schema(labels: Sequence[str]) -> str:
    allowed = ", ".join("'" + label.replace("'", "''") + "'" for label in labels)
    return f"""
CREATE TABLE IF NOT EXISTS labels (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    item_id TEXT NOT NULL,
    annotator TEXT NOT NULL,
    label TEXT NOT NULL CHECK (label IN ({allowed})),
    category TEXT,
    note TEXT NOT NULL DEFAULT '',
    created_at TEXT NOT NULL,
    source TEXT NOT NULL,
    superseded_by INTEGER REFERENCES labels(id)
);
CREATE UNIQUE INDEX IF NOT EXISTS one_current_label
    ON labels (item_id, annotator) WHERE superseded_by IS NULL;
"""


class LabelHistory(_Store):
    """labels.sqlite: every label ever given, one current label per (item_id, annotator).

    ``labels`` are the values a label may take, ``categories`` the failure categories a label
    may carry (none when empty) and ``without_category`` the labels that carry none (the
    pilot's "ok"). ``owner=("pilot", pilot_id)`` binds the file to one owner: a table named
    ``pilot`` holds ``pilot_id``, and opening the file for another owner is an InputError —
    so one pilot's labels are never read as another's. A new file's ``label`` column CHECKs
    ``labels``; a file's schema is never changed except to add the ``category`` column an
    older file lacks. ``label_model`` is the Label subclass rows are read as (a page may
    narrow ``label`` to its Literal).
    """

    def __init__(
        self,
        path: str | Path,
        labels: Sequence[str],
        categories: Sequence[str] = (),
        owner: tuple[str, str] | None = None,
        *,
        without_category: Sequence[str] = (),
        label_model: type[Label] = Label,
    ):
        if not labels:
            raise ValueError("LabelHistory needs the labels it accepts")
        super().__init__(path)
        self.labels = tuple(labels)
        self.categories = tuple(categories)
        self.without_category = tuple(without_category)
        self.label_model = label_model
        self.owner = owner
        try:
            self._db.executescript(_labels_schema(self.labels))
            columns = {row["name"] for row in self._db.execute("PRAGMA table_info(labels)")}
            if "category" not in columns:
                self._db.execute("ALTER TABLE labels ADD COLUMN category TEXT")
            if owner is not None:
                self._bind(*owner)
        except BaseException:
            self._db.close()
            raise

    def _bind(self, kind: str, owner_id: str) -> None:
        if not _IDENTIFIER.match(kind):
            raise ValueError(f"owner kind {kind!r} is not a lower-case identifier")
        column = f"{kind}_id"
        self._db.execute(f"CREATE TABLE IF NOT EXISTS {kind} ({column} TEXT NOT NULL)")
        with self._write() as db:
            row = db.execute(f"SELECT {column} FROM {kind}").fetchone()
            if row is None:
                db.execute(f"INSERT INTO {kind} ({column}) VALUES (?)", (owner_id,))
            elif row[column] != owner_id:
                raise InputError(
                    f"{self.path} holds labels of {kind} {row[column]!r}, not of {owner_id!r}"
                )

    def _label(self, row: sqlite3.Row) -> Label:
        return self.label_model(**dict(row))

    def get(self, item_id: str, annotator: str) -> Label | None:
        """The current label of an item by an annotator, if any."""
        rows = self._read(
            "SELECT * FROM labels WHERE item_id = ? AND annotator = ? AND superseded_by IS NULL",
            (item_id, annotator),
        )
        return self._label(rows[0]) if rows else None

    def current(self, annotator: str | None = None) -> list[Label]:
        """Current labels, of one annotator or of all, in item then annotator order."""
        query = "SELECT * FROM labels WHERE superseded_by IS NULL"
        args: tuple[str, ...] = ()
        if annotator is not None:
            query += " AND annotator = ?"
            args = (annotator,)
        return [self._label(r) for r in self._read(query + " ORDER BY item_id, annotator", args)]

    def history(self, item_id: str, annotator: str | None = None) -> list[Label]:
        """Every label ever given to an item (by one annotator), oldest first."""
        query = "SELECT * FROM labels WHERE item_id = ?"
        args: tuple[str, ...] = (item_id,)
        if annotator is not None:
            query += " AND annotator = ?"
            args += (annotator,)
        return [self._label(r) for r in self._read(query + " ORDER BY id", args)]

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
        label, category, note = check_label(
            label, category, note, self.labels, self.categories, self.without_category
        )
        if not isinstance(item_id, str) or not item_id:
            raise InputError("a label names the item it is given to (item_id)")
        with self._write() as db:
            row = db.execute(
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
                return LabelChange("unchanged", previous, previous)
            new_id = _insert_superseding(
                db,
                "labels",
                previous.id if previous else None,
                "INSERT INTO labels (item_id, annotator, label, category, note, created_at,"
                " source) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (item_id, annotator, label, category, note, now(), source),
            )
            new = self._label(db.execute("SELECT * FROM labels WHERE id = ?", (new_id,)).fetchone())
        return LabelChange("changed" if previous else "created", new, previous)


def _insert_superseding(
    db: sqlite3.Connection, table: str, previous_id: int | None, insert: str, args: tuple[Any, ...]
) -> int:
    """Insert a row that replaces ``previous_id`` (if any), which then points at it."""
    # Retire the old row first: the unique index allows one current row only.
    if previous_id is not None:
        db.execute(f"UPDATE {table} SET superseded_by = -1 WHERE id = ?", (previous_id,))
    cursor = db.execute(insert, args)
    new_id = cursor.lastrowid
    assert new_id is not None
    if previous_id is not None:
        db.execute(f"UPDATE {table} SET superseded_by = ? WHERE id = ?", (new_id, previous_id))
    return new_id


# ---------------------------------------------------------------- documents

Action = Literal["written", "edited", "revised", "approved"]

_DOCUMENTS_SCHEMA = """
CREATE TABLE IF NOT EXISTS versions (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    doc_id TEXT NOT NULL,
    annotator TEXT NOT NULL,
    action TEXT NOT NULL CHECK (action IN ('written', 'edited', 'revised', 'approved')),
    body TEXT NOT NULL,
    created_at TEXT NOT NULL,
    source TEXT NOT NULL,
    superseded_by INTEGER REFERENCES versions(id)
);
CREATE UNIQUE INDEX IF NOT EXISTS one_current_version
    ON versions (doc_id) WHERE superseded_by IS NULL;
CREATE INDEX IF NOT EXISTS versions_of_doc ON versions (doc_id, id);
"""

MAX_DOC_ID_LENGTH = 128
_DOC_ID = re.compile(r"^[A-Za-z0-9._:-]+$")


def is_doc_id(value: object) -> bool:
    """Whether ``value`` may be a document id as it is (a caller mapping its own ids, such as
    a benchmark's question ids, keeps the others under a digest)."""
    return isinstance(value, str) and len(value) <= MAX_DOC_ID_LENGTH and bool(_DOC_ID.match(value))


@dataclass
class Version:
    """One saved state of a document: who saved it, how, and what it said."""

    annotator: str
    action: Action
    body: dict[str, Any]
    created_at: str
    source: str


@dataclass
class Document:
    """A document's current body with its author, review status and every version."""

    doc_id: str
    body: dict[str, Any]
    author: str
    status: Literal["approved", "pending"]
    # The paper's count: documents a second annotator changed before they were kept.
    revised: bool
    created_at: str
    updated_at: str
    history: list[Version] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _canonical(body: dict[str, Any]) -> str:
    if not isinstance(body, dict):
        raise InputError(f"a document body is a JSON object, not {type(body).__name__}")
    try:
        return json.dumps(body, sort_keys=True, ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise InputError(f"a document body must be plain JSON: {exc}") from None


def _document(doc_id: str, rows: Sequence[sqlite3.Row]) -> Document:
    history = [
        Version(r["annotator"], r["action"], json.loads(r["body"]), r["created_at"], r["source"])
        for r in rows
    ]
    current = history[-1]
    return Document(
        doc_id=doc_id,
        body=current.body,
        author=history[0].annotator,
        status="approved" if current.action == "approved" else "pending",
        revised=any(v.action == "revised" for v in history),
        created_at=history[0].created_at,
        updated_at=current.created_at,
        history=history,
    )


class DocumentHistory(_Store):
    """Every version of every document; one current version per ``doc_id``.

    An author writes a document ("written") and may edit it ("edited"); another annotator
    may revise it ("revised") or approve it ("approved", a copy of the current body). Only
    a current "approved" version is approved: any later change makes the document pending
    again. ``what`` names a document in error messages ("seed", "question").
    """

    def __init__(self, path: str | Path, *, what: str = "document"):
        super().__init__(path)
        self.what = what
        try:
            self._db.executescript(_DOCUMENTS_SCHEMA)
        except BaseException:
            self._db.close()
            raise

    def _rows(self, db: sqlite3.Connection, doc_id: str) -> list[sqlite3.Row]:
        return db.execute(
            "SELECT * FROM versions WHERE doc_id = ? ORDER BY id", (doc_id,)
        ).fetchall()

    def _check_id(self, doc_id: str) -> str:
        if (
            not isinstance(doc_id, str)
            or len(doc_id) > MAX_DOC_ID_LENGTH
            or not _DOC_ID.match(doc_id)
        ):
            raise InputError(
                f"{self.what} id {str(doc_id)[:40]!r} is not up to {MAX_DOC_ID_LENGTH} letters,"
                " digits, '.', '_', ':' or '-'"
            )
        return doc_id

    def save(
        self,
        doc_id: str | None,
        annotator: str,
        body: dict[str, Any],
        *,
        source: str = "web",
        create: bool = False,
    ) -> Document:
        """Save a new version and return the document.

        ``doc_id=None`` writes a new document under a fresh id (uuid4 hex). An id that does
        not exist is an InputError, unless ``create=True``: then it is written under that id
        (deterministic ids, e.g. one document per probed question). Its author saving again
        edits it, another annotator revises it; a body identical to the current one adds no
        version and returns the document as it is.
        """
        annotator = check_annotator(annotator, allow_auto=source == "auto")
        text = _canonical(body)
        minted = doc_id is None
        doc_id = uuid.uuid4().hex if doc_id is None else self._check_id(doc_id)
        with self._write() as db:
            rows = self._rows(db, doc_id)
            if not rows and not minted and not create:
                raise InputError(f"no {self.what} {doc_id!r}")
            if rows:
                current = rows[-1]
                if current["body"] == text:
                    return _document(doc_id, rows)
                action: Action = "edited" if annotator == rows[0]["annotator"] else "revised"
                previous_id: int | None = current["id"]
            else:
                action, previous_id = "written", None
            _insert_superseding(
                db,
                "versions",
                previous_id,
                "INSERT INTO versions (doc_id, annotator, action, body, created_at, source)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (doc_id, annotator, action, text, now(), source),
            )
            return _document(doc_id, self._rows(db, doc_id))

    def approve(self, doc_id: str, annotator: str, *, source: str = "web") -> Document:
        """A second annotator approves the current body (kept as an "approved" version).

        The author cannot approve their own document; approving an approved document again
        changes nothing.
        """
        annotator = check_annotator(annotator)
        self._check_id(doc_id)
        with self._write() as db:
            rows = self._rows(db, doc_id)
            if not rows:
                raise InputError(f"no {self.what} {doc_id!r}")
            if annotator == rows[0]["annotator"]:
                raise InputError(
                    f"{annotator} wrote this {self.what}: a second annotator approves it"
                )
            current = rows[-1]
            if current["action"] == "approved":
                return _document(doc_id, rows)
            _insert_superseding(
                db,
                "versions",
                current["id"],
                "INSERT INTO versions (doc_id, annotator, action, body, created_at, source)"
                " VALUES (?, ?, 'approved', ?, ?, ?)",
                (doc_id, annotator, current["body"], now(), source),
            )
            return _document(doc_id, self._rows(db, doc_id))

    def get(self, doc_id: str) -> Document | None:
        """The document with its history, or None if there is no such id."""
        rows = self._read("SELECT * FROM versions WHERE doc_id = ? ORDER BY id", (doc_id,))
        return _document(doc_id, rows) if rows else None

    def documents(self) -> list[Document]:
        """Every document, current body and history, oldest (first written) first."""
        by_doc: dict[str, list[sqlite3.Row]] = {}
        for row in self._read("SELECT * FROM versions ORDER BY id"):
            by_doc.setdefault(row["doc_id"], []).append(row)
        return [_document(doc_id, rows) for doc_id, rows in by_doc.items()]

    def history(self, doc_id: str) -> list[Version]:
        """Every version of a document, oldest first (empty if there is no such id)."""
        document = self.get(doc_id)
        return document.history if document else []
