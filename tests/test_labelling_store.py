"""labelling.store: the label and document histories every labelling page keeps."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import pytest

from labelling.store import AUTO_ANNOTATOR, DocumentHistory, LabelHistory
from qualification.labels import LabelStore
from vkr_core.schemas import InputError

AUDIT_LABELS = ("ok", "not_grounded", "trace_error", "unsupported_step")

# The schema qualification/labels.py wrote before labelling/ existed, verbatim: pilots
# labelled then must open unchanged.
OLD_PILOT_SCHEMA = """
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


def _schema(path: Path) -> list[tuple[str, str]]:
    db = sqlite3.connect(path)
    try:
        return db.execute("SELECT name, sql FROM sqlite_master ORDER BY name").fetchall()
    finally:
        db.close()


def _old_pilot_file(path: Path) -> None:
    db = sqlite3.connect(path)
    db.executescript(OLD_PILOT_SCHEMA)
    db.execute("INSERT INTO pilot VALUES ('pilot-a')")
    rows = [
        ("i1", "ana", "hard", "hallucination", "cites 0:12", "t0", "web", 2),
        ("i1", "ana", "ok", None, "", "t1", "web", None),
        ("i2", "auto", "hard", "format", "bad json", "t2", "auto", None),
    ]
    db.executemany(
        "INSERT INTO labels (item_id, annotator, label, category, note, created_at, source,"
        " superseded_by) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        rows,
    )
    db.commit()
    db.close()


def test_an_old_pilot_labels_file_opens_unchanged_with_its_history(tmp_path: Path) -> None:
    path = tmp_path / "labels.sqlite"
    _old_pilot_file(path)
    before = _schema(path)
    with LabelStore(path, "pilot-a") as store:
        assert [(x.label, x.superseded_by) for x in store.history("i1", "ana")] == [
            ("hard", 2),
            ("ok", None),
        ]
        assert store.get("i2", AUTO_ANNOTATOR).category == "format"  # type: ignore[union-attr]
        change = store.set("i1", "ana", "soft", "wrong answer", "B is right")
        assert change.status == "changed" and change.previous and change.previous.label == "ok"
    assert _schema(path) == before
    # The pilot's CHECK still guards the file against a label outside ok/hard/soft.
    db = sqlite3.connect(path)
    with pytest.raises(sqlite3.IntegrityError):
        db.execute(
            "INSERT INTO labels (item_id, annotator, label, created_at, source)"
            " VALUES ('i3', 'bo', 'great', 't', 'web')"
        )
    db.close()
    with pytest.raises(InputError, match=r"holds labels of pilot 'pilot-a', not of 'pilot-b'"):
        LabelStore(path, "pilot-b")
    # The generic store opens the pilot's file as the pilot's own binding does.
    with LabelHistory(path, ("ok", "hard", "soft"), owner=("pilot", "pilot-a")) as generic:
        assert [x.label for x in generic.current("ana")] == ["soft"]


def test_labels_keep_their_history_and_an_unchanged_label_adds_no_row(tmp_path: Path) -> None:
    with LabelHistory(tmp_path / "labels.sqlite", AUDIT_LABELS) as store:
        assert store.set("q1", " ana ", "ok").status == "created"
        assert store.set("q1", "ana", "ok").status == "unchanged"
        change = store.set("q1", "ana", "trace_error", note="step 3 reads 0:41 wrong")
        assert change.status == "changed" and change.previous and change.previous.label == "ok"
        store.set("q1", "bo", "not_grounded")
        assert [x.label for x in store.history("q1", "ana")] == ["ok", "trace_error"]
        assert [(x.annotator, x.label) for x in store.current()] == [
            ("ana", "trace_error"),
            ("bo", "not_grounded"),
        ]
        assert store.get("q1", "ana").note == "step 3 reads 0:41 wrong"  # type: ignore[union-attr]
        assert store.get("q2", "ana") is None


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda s: s.set("q1", "", "ok"), r"^an annotator name is required"),
        (lambda s: s.set("q1", "x" * 65, "ok"), r"is longer than 64 characters$"),
        (lambda s: s.set("q1", "auto", "ok"), r"'auto' is reserved for labels vkr sets itself"),
        (lambda s: s.set("q1", "ana", "fine"), r"^label 'fine' is not one of ok, hard, soft$"),
        (lambda s: s.set("q1", "ana", "hard", "typo"), r"^category 'typo' is not one of"),
        (lambda s: s.set("q1", "ana", "ok", "format"), r"^an ok label has no failure category"),
        (lambda s: s.set("q1", "ana", "ok", note="n" * 4001), r"longer than 4000 characters"),
        (lambda s: s.set("q1", "ana", "ok", note=3), r"^the note must be text$"),
        (lambda s: s.set("", "ana", "ok"), r"names the item"),
    ],
)
def test_a_bad_label_is_refused_in_one_line_and_nothing_is_written(
    tmp_path: Path, call, message: str
) -> None:
    with LabelHistory(
        tmp_path / "l.sqlite", ("ok", "hard", "soft"), ("format",), without_category=("ok",)
    ) as store:
        with pytest.raises(InputError, match=message):
            call(store)
        assert store.current() == []
        # vkr itself may label as "auto".
        assert store.set("q1", AUTO_ANNOTATOR, "hard", "format", source="auto").status == (
            "created"
        )


def test_labels_without_categories_refuse_one(tmp_path: Path) -> None:
    with LabelHistory(tmp_path / "l.sqlite", AUDIT_LABELS) as store:
        with pytest.raises(InputError, match=r"^these labels take no category"):
            store.set("q1", "ana", "ok", "format")


def test_an_older_file_without_a_category_column_gains_it(tmp_path: Path) -> None:
    # The audit page's labels.sqlite before labelling/ had no category column.
    path = tmp_path / "labels.sqlite"
    db = sqlite3.connect(path)
    db.executescript(
        "CREATE TABLE labels (id INTEGER PRIMARY KEY AUTOINCREMENT, item_id TEXT NOT NULL,"
        " annotator TEXT NOT NULL, label TEXT NOT NULL, note TEXT NOT NULL DEFAULT '',"
        " created_at TEXT NOT NULL, source TEXT NOT NULL,"
        " superseded_by INTEGER REFERENCES labels(id));"
        "INSERT INTO labels (item_id, annotator, label, note, created_at, source)"
        " VALUES ('q1', 'ana', 'trace_error', 'x', 't0', 'web');"
    )
    db.close()
    with LabelHistory(path, AUDIT_LABELS) as store:
        assert store.get("q1", "ana").label == "trace_error"  # type: ignore[union-attr]
        assert store.set("q1", "ana", "ok").status == "changed"


def test_concurrent_labels_from_threads_keep_one_current_row(tmp_path: Path) -> None:
    path = tmp_path / "labels.sqlite"
    with LabelHistory(path, AUDIT_LABELS) as store, LabelHistory(path, AUDIT_LABELS) as other:
        barrier = threading.Barrier(8)
        errors: list[BaseException] = []

        def label(n: int) -> None:
            target = store if n % 2 else other  # two connections: two processes' worth
            try:
                barrier.wait()
                for k in range(10):
                    target.set("q1", "ana", AUDIT_LABELS[(n + k) % 4], note=f"{n}-{k}")
            except BaseException as exc:  # collected and asserted below
                errors.append(exc)

        threads = [threading.Thread(target=label, args=(n,)) for n in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert errors == []
        history = store.history("q1", "ana")
        assert len(history) == 80
        assert len(store.current()) == 1
        # The versions form one chain: each old row points at a later one, none is lost.
        ids = {x.id for x in history}
        assert all(x.superseded_by in ids for x in history[:-1])
        assert history[-1].superseded_by is None


# ---------------------------------------------------------------- documents


def test_a_document_is_written_edited_revised_and_approved_with_its_history(
    tmp_path: Path,
) -> None:
    with DocumentHistory(tmp_path / "seeds.sqlite", what="seed") as docs:
        seed = docs.save(None, "ana", {"question": "Which tool?", "answer": "B"})
        assert len(seed.doc_id) == 32 and seed.status == "pending" and seed.author == "ana"
        assert [v.action for v in seed.history] == ["written"]
        # The same body again (keys in another order) adds no version.
        same = docs.save(seed.doc_id, "ana", {"answer": "B", "question": "Which tool?"})
        assert len(same.history) == 1
        edited = docs.save(seed.doc_id, "ana", {"question": "Which tool at 0:12?", "answer": "B"})
        assert [v.action for v in edited.history] == ["written", "edited"]
        assert not edited.revised
        with pytest.raises(InputError, match=r"^ana wrote this seed: a second annotator approves"):
            docs.approve(seed.doc_id, "ana")
        revised = docs.save(seed.doc_id, "bo", {"question": "Which tool at 0:12?", "answer": "C"})
        assert revised.revised and revised.status == "pending" and revised.author == "ana"
        approved = docs.approve(seed.doc_id, "cy")
        assert approved.status == "approved" and approved.body["answer"] == "C"
        assert approved.history[-1].annotator == "cy"
        assert docs.approve(seed.doc_id, "bo").history == approved.history  # no new version
        # A change after approval makes the document pending again.
        again = docs.save(seed.doc_id, "ana", {"question": "Which tool at 0:13?", "answer": "C"})
        assert again.status == "pending" and again.history[-1].action == "edited"
        assert [v.action for v in docs.history(seed.doc_id)] == [
            "written",
            "edited",
            "revised",
            "approved",
            "edited",
        ]
        assert docs.get(seed.doc_id) == again
        assert docs.get("nope") is None and docs.history("nope") == []
        assert again.to_json()["history"][0] == {
            "annotator": "ana",
            "action": "written",
            "body": {"question": "Which tool?", "answer": "B"},
            "created_at": seed.created_at,
            "source": "web",
        }
        assert (again.created_at, again.updated_at) == (
            seed.created_at,
            again.history[-1].created_at,
        )


def test_documents_are_listed_oldest_first_and_counted_as_revised(tmp_path: Path) -> None:
    path = tmp_path / "docs.sqlite"
    with DocumentHistory(path) as docs:
        first = docs.save(None, "ana", {"n": 1})
        second = docs.save(None, "bo", {"n": 2})
        docs.save(second.doc_id, "ana", {"n": 3})
        docs.save(first.doc_id, "ana", {"n": 4})
    with DocumentHistory(path) as docs:  # reopened: everything was on disk
        listed = docs.documents()
        assert [d.doc_id for d in listed] == [first.doc_id, second.doc_id]
        assert [d.body["n"] for d in listed] == [4, 3]
        assert sum(d.revised for d in listed) == 1


def test_a_caller_chosen_id_is_created_only_when_asked(tmp_path: Path) -> None:
    with DocumentHistory(tmp_path / "q.sqlite", what="question") as docs:
        with pytest.raises(InputError, match=r"^no question 'video1:q3'$"):
            docs.save("video1:q3", "ana", {"q": "?"})
        with pytest.raises(InputError, match=r"^no question 'video1:q3'$"):
            docs.approve("video1:q3", "bo")
        doc = docs.save("video1:q3", "ana", {"q": "?"}, create=True)
        assert doc.doc_id == "video1:q3" and doc.history[0].action == "written"
        # create=True on an existing id saves a new version as usual.
        assert docs.save("video1:q3", "bo", {"q": "!"}, create=True).revised
        with pytest.raises(InputError, match=r"is not up to 128 letters"):
            docs.save("../etc", "ana", {"q": "?"}, create=True)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (["not", "an", "object"], r"^a document body is a JSON object, not list$"),
        ({"x": float("nan")}, r"^a document body must be plain JSON"),
        ({"x": object()}, r"^a document body must be plain JSON"),
    ],
)
def test_a_body_that_is_not_plain_json_is_refused(tmp_path: Path, body, message: str) -> None:
    with DocumentHistory(tmp_path / "d.sqlite") as docs:
        with pytest.raises(InputError, match=message):
            docs.save(None, "ana", body)
        assert docs.documents() == []


def test_concurrent_saves_of_one_document_keep_one_current_version(tmp_path: Path) -> None:
    path = tmp_path / "docs.sqlite"
    with DocumentHistory(path) as docs, DocumentHistory(path) as other:
        doc = docs.save(None, "ana", {"n": -1})
        barrier = threading.Barrier(6)
        errors: list[BaseException] = []

        def save(n: int) -> None:
            target = docs if n % 2 else other
            try:
                barrier.wait()
                for k in range(10):
                    target.save(doc.doc_id, f"annotator{n}", {"n": n, "k": k})
            except BaseException as exc:  # collected and asserted below
                errors.append(exc)

        threads = [threading.Thread(target=save, args=(n,)) for n in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert errors == []
        assert len(docs.history(doc.doc_id)) == 61
        db = sqlite3.connect(path)
        current = db.execute("SELECT COUNT(*) FROM versions WHERE superseded_by IS NULL")
        assert current.fetchone() == (1,)
        db.close()


def test_a_file_that_is_not_a_database_is_one_clear_error(tmp_path: Path) -> None:
    damaged = tmp_path / "labels.sqlite"
    damaged.write_text("these are notes, not labels\n" * 20)
    for open_store in (
        lambda: LabelHistory(damaged, AUDIT_LABELS),
        lambda: DocumentHistory(damaged),
        lambda: DocumentHistory(tmp_path / "missing" / "seeds.sqlite"),
    ):
        with pytest.raises(InputError, match=r"^cannot open .*: (file is not a database|unable)"):
            open_store()
    assert damaged.read_text().startswith("these are notes")
