"""Re-annotation through Label Studio or Argilla: tasks out, the experts' new items back in.

The files follow ``qualification/interchange.py``. Label Studio: a JSON list of tasks
``{"id", "data"}`` with a config (XML) written next to it; its JSON export returns them with
``annotations[].result``. Argilla 2.x: the ``rg.Dataset.to_disk`` layout (``records.json``,
``.argilla/``); its records come back with ``responses``.

Review travels with the tasks: written from a re-annotation folder, a task carries the
question's current new item (Label Studio: a prediction; Argilla: suggestions), who wrote it,
its status, and the time of the version it shows (``based_on``). What comes back is read
as the page would take it (``plan``): the first item for a question writes it; its author's
changed item edits it, another annotator's revises it; another annotator's item identical to
the current one approves it (submitting the shown item unchanged is the review's "ok"); an
item its annotator already saved (an export imported again) changes nothing. A changed item
made on an older version than the current one (or on no version, when the question has
been written since) is a conflict: nothing is imported unless ``overwrite`` is given.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from experts.reannotate import (
    FilteredVideo,
    approve_item,
    check_item,
    doc_id,
    load_filtered,
    open_store,
    save_item,
)
from labelling.interchange import (
    Imported,
    argilla_record,
    frame_urls,
    frames_markdown,
    label_question,
    ls_choice,
    ls_prediction,
    ls_text,
    settings,
    suggestion,
    terms_metadata,
    text_field,
    text_question,
    write_json,
    write_text,
)
from labelling.interchange import read_argilla as argilla_responses
from labelling.interchange import read_labelstudio as ls_annotations
from labelling.interchange import write_argilla as write_dataset
from labelling.store import Document, DocumentHistory, check_annotator
from vkr_core.schemas import InputError

_TEXT_FIELDS = ("question", "options", "answer", "grounding")
# What Label Studio records as the model version of the current items a task shows.
PREDICTION_VERSION = "vkr current item"

CONFIG = """<View>
  <Header value="$source_id · $video_path"/>
  <Image name="frames" valueList="$frames"/>
  <Text name="frame_times" value="$frame_times"/>
  <Header value="Original question (filtered: answered from a single frame)"/>
  <Text name="original" value="$original"/>
  <Header value="$review"/>
  <Header value="New question, grounded in the frames"/>
  <TextArea name="question" toName="original" rows="3" maxSubmissions="1" required="true"/>
  <Choices name="problem_type" toName="original" choice="single-radio" required="true">
    <Choice value="multiple-choice"/>
    <Choice value="open-ended"/>
  </Choices>
  <TextArea name="options" toName="original" rows="5" maxSubmissions="1"
            placeholder="one option per line (multiple-choice)"/>
  <TextArea name="answer" toName="original" maxSubmissions="1" required="true"
            placeholder="option letter, or the open answer"/>
  <TextArea name="grounding" toName="original" maxSubmissions="1" required="true"
            placeholder="seconds of the frames that show the answer, comma separated"/>
</View>
"""


def _original(source: FilteredVideo) -> str:
    row = source.row
    lines = [str(row.get("question", ""))]
    lines += [str(o) for o in row.get("options") or []]
    lines.append(f"answer: {row.get('solution', '')}")
    lines.append("solved from one frame by: " + ", ".join(map(str, row.get("solved_by") or [])))
    return "\n".join(lines)


def _review(document: Document | None) -> str:
    """What the annotator of a task is asked: write, or review what is written."""
    if document is None:
        return "Not written yet: write a new question."
    versions = "; ".join(f"{v.action} by {v.annotator}" for v in document.history)
    if document.status == "approved":
        return f"Approved ({versions}). Change it only if it is wrong."
    return (
        f"Pending review ({versions}). A second annotator submits it unchanged to approve it, "
        "or corrects it to revise it."
    )


def _texts(document: Document) -> dict[str, Any]:
    """A document's item as the tool's answers hold it (texts, and the type's choice)."""
    body = document.body
    return {
        "question": body["question"],
        "problem_type": body["problem_type"],
        "options": "\n".join(body["options"] or []),
        "answer": body["answer"],
        "grounding": ", ".join(f"{t:g}" for t in body["grounding"]),
    }


def _current(reannotations: str | Path | None) -> dict[str, Document]:
    """The documents of a re-annotation folder by doc id (none without one)."""
    if reannotations is None:
        return {}
    with open_store(reannotations) as store:
        return {d.doc_id: d for d in store.documents()}


def _review_data(document: Document | None) -> dict[str, Any]:
    return {
        "review": _review(document),
        "status": document.status if document else "not written",
        "author": document.author if document else "",
        # The version the task shows: a changed item made on another is a conflict.
        "based_on": document.updated_at if document else "",
    }


def write_tasks(
    probe_out: str | Path,
    out: str | Path,
    frame_url_prefix: str = "",
    frames_dir: str | Path | None = None,
    reannotations: str | Path | None = None,
) -> tuple[Path, Path]:
    """Label Studio tasks for the probe's filtered questions, and the config beside them.

    A frame's URL is ``frame_url_prefix`` + its path under the probe's frames folder. With
    ``reannotations``, a written question's task carries its current item as a prediction
    (a reviewer submits it unchanged, or corrects it)."""
    current = _current(reannotations)
    tasks = []
    for n, source in enumerate(load_filtered(probe_out, frames_dir), start=1):
        document = current.get(doc_id(source.source_id))
        task: dict[str, Any] = {
            "id": n,
            "data": {
                "source_id": source.source_id,
                "video_path": str(source.row["video_path"]),
                "original": _original(source),
                "frames": _frame_urls(source, frame_url_prefix),
                "frame_times": ", ".join(f"{t:g}s" for t, _ in source.frames),
                **_review_data(document),
            },
        }
        if document is not None:
            task["predictions"] = [ls_prediction(_ls_results(_texts(document)), PREDICTION_VERSION)]
        tasks.append(task)
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, tasks)
    config = path.with_suffix(".xml")
    write_text(config, CONFIG)
    return path, config


def _frame_urls(source: FilteredVideo, prefix: str) -> list[str]:
    # Relative to the probe's frames folder: one folder per video, as the probe wrote it.
    return frame_urls([Path(path.parent.name, path.name) for _, path in source.frames], prefix)


def _ls_results(texts: dict[str, Any]) -> list[dict[str, Any]]:
    results = [ls_choice("problem_type", "original", texts["problem_type"])]
    results += [ls_text(name, "original", texts[name]) for name in _TEXT_FIELDS if texts[name]]
    return results


GUIDELINES = (
    "These questions were filtered from an evaluation set because one random frame answers "
    "them. Write a new question on the same video that needs the video: its options (one per "
    "line) or an open answer, the answer (an option letter, or the open answer) and the "
    "seconds of the frames that show it, comma separated. A question already written shows "
    "its current item as suggestions: a second annotator submits them unchanged to approve "
    "it, or corrects them to revise it."
)


def argilla_settings() -> dict[str, Any]:
    """The dataset Settings in the shape ``rg.Settings.to_json`` writes."""
    return settings(
        fields=[
            text_field("frames", "Frames", markdown=True),
            text_field("original", "Original question"),
            text_field("review", "Review"),
        ],
        questions=[
            text_question("question", "New question", required=True),
            label_question("problem_type", "Type", ["multiple-choice", "open-ended"]),
            text_question("options", "Options, one per line"),
            text_question("answer", "Answer", required=True),
            text_question("grounding", "Grounding seconds, comma separated", required=True),
        ],
        metadata=[
            terms_metadata(n)
            for n in ("source_id", "video_path", "dataset", "status", "author", "based_on")
        ],
        guidelines=GUIDELINES,
    )


def write_argilla(
    probe_out: str | Path,
    out: str | Path,
    frame_url_prefix: str = "",
    frames_dir: str | Path | None = None,
    reannotations: str | Path | None = None,
) -> list[Path]:
    """An ``rg.Dataset.to_disk`` folder (records.json, .argilla/) of the filtered questions;
    with ``reannotations``, a written question's current item as its record's suggestions."""
    current = _current(reannotations)
    records = []
    for source in load_filtered(probe_out, frames_dir):
        document = current.get(doc_id(source.source_id))
        frames = frames_markdown(
            _frame_urls(source, frame_url_prefix), [f"{t:g}s" for t, _ in source.frames]
        )
        review = _review_data(document)
        suggestions = {}
        if document is not None:
            suggestions = {
                name: suggestion(value, PREDICTION_VERSION)
                for name, value in _texts(document).items()
                if value
            }
        records.append(
            argilla_record(
                fields={
                    "frames": frames or "(no frames)",
                    "original": _original(source),
                    "review": review.pop("review"),
                },
                metadata={
                    "source_id": source.source_id,
                    "video_path": str(source.row["video_path"]),
                    "dataset": str(source.row.get("dataset", "")),
                    **review,
                },
                suggestions=suggestions,
                record_id=source.source_id,
            )
        )
    return write_dataset(Path(out), "vkr-reannotation", argilla_settings(), records)


def _grounding(text: str, where: str) -> list[float]:
    stamps = []
    for part in text.replace(";", ",").split(","):
        part = part.strip().removesuffix("s").strip()
        if not part:
            continue
        try:
            stamps.append(float(part))
        except ValueError:
            raise InputError(f"{where}: grounding {part!r} is not seconds") from None
    return stamps


@dataclass
class Incoming:
    """One item read back from a tool, checked as the page checks it."""

    source_id: str
    annotator: str
    item: dict[str, Any]
    where: str
    # The updated_at of the version the task showed ("" for none).
    based_on: str


def _incoming(answer: Imported, sources: dict[str, FilteredVideo]) -> Incoming:
    """A tool's answer on a filtered question as a checked item, or InputError naming it."""
    source = sources.get(answer.item_id)
    if source is None:
        raise InputError(f"{answer.where}: no filtered question {answer.item_id!r}")
    try:
        annotator = check_annotator(answer.annotator)
    except InputError as exc:
        raise InputError(f"{answer.where}: {exc}") from None
    where = (
        answer.where
        if answer.where.endswith(f" by {annotator}")
        else f"{answer.where} by {annotator}"
    )
    values = answer.values
    texts = {k: str(values[k]) for k in _TEXT_FIELDS if values.get(k) is not None}
    body = {
        "question": texts.get("question", ""),
        "problem_type": values.get("problem_type"),
        "options": texts.get("options", "").splitlines(),
        "answer": texts.get("answer", ""),
        "grounding": _grounding(texts.get("grounding", ""), where),
    }
    try:
        item = check_item(source, body)
    except InputError as exc:
        raise InputError(f"{where}: {exc}") from None
    based_on = str(answer.task_data.get("based_on") or "")
    return Incoming(source.source_id, annotator, item, where, based_on)


def read_labelstudio(path: Path, sources: dict[str, FilteredVideo]) -> list[Incoming]:
    """Items from a Label Studio JSON export of the tasks ``write_tasks`` wrote."""
    return [_incoming(a, sources) for a in ls_annotations(path, "source_id")]


def read_argilla(path: Path, sources: dict[str, FilteredVideo]) -> list[Incoming]:
    """Items from Argilla records (an ``rg.Dataset.to_disk`` folder or its records.json)."""
    return [_incoming(a, sources) for a in argilla_responses(path, "source_id")]


@dataclass
class Counts:
    written: int = 0
    changed: int = 0
    approved: int = 0
    unchanged: int = 0


@dataclass
class _State:
    """A question's document as the import will have left it so far."""

    body: dict[str, Any]
    author: str
    saved_by: str
    status: str
    stamp: str
    # (annotator, item) of every version its annotator wrote, edited or revised.
    saved: list[tuple[str, dict[str, Any]]]

    @classmethod
    def of(cls, document: Document) -> _State:
        return cls(
            document.body,
            document.author,
            document.history[-1].annotator,
            document.status,
            document.updated_at,
            [(v.annotator, v.body) for v in document.history if v.action != "approved"],
        )


def plan(
    store: DocumentHistory, incoming: list[Incoming], overwrite: bool = False
) -> list[tuple[str, Incoming]]:
    """What each incoming item does (write, change, approve, none), decided for all before
    any is saved: a conflict (InputError naming where) imports nothing."""
    states: dict[str, _State] = {}
    steps: list[tuple[str, Incoming]] = []
    for entry in incoming:
        sid = entry.source_id
        if sid not in states:
            document = store.get(doc_id(sid))
            if document is not None:
                states[sid] = _State.of(document)
        state = states.get(sid)
        who, item = entry.annotator, entry.item
        if state is None:
            action = "write"
            states[sid] = _State(item, who, who, "pending", "(this import)", [(who, item)])
        elif (who, item) in state.saved:
            action = "none"  # an export imported again, or an item since changed by others
        elif item == state.body:
            if state.status == "pending" and who not in (state.author, state.saved_by):
                action = "approve"
                state.status, state.saved_by, state.stamp = "approved", who, "(this import)"
            else:
                action = "none"
        else:
            if entry.based_on != state.stamp and not overwrite:
                shown = f"the version of {entry.based_on}" if entry.based_on else "no item"
                raise InputError(
                    f"{entry.where}: {sid} was changed since these tasks were written "
                    f"(they showed {shown}; now {state.status}, last saved by "
                    f"{state.saved_by}); nothing was imported (write the tasks again with "
                    "--reannotations to review its current item, or pass --overwrite to save "
                    "over it, history is kept)"
                )
            action = "change"
            state.body, state.saved_by, state.status = item, who, "pending"
            state.stamp = "(this import)"
            state.saved.append((who, item))
        steps.append((action, entry))
    return steps


def import_labels(
    reannotations: str | Path,
    probe_out: str | Path,
    fmt: str,
    path: str | Path,
    overwrite: bool = False,
) -> Counts:
    """Read a Label Studio export or Argilla records into the store; every item is checked
    and planned before any is written, so a bad one (named with where it came from) changes
    nothing."""
    sources = {s.source_id: s for s in load_filtered(probe_out)}
    if fmt == "labelstudio":
        incoming = read_labelstudio(Path(path), sources)
    elif fmt == "argilla":
        incoming = read_argilla(Path(path), sources)
    else:
        raise InputError(f"unknown label format {fmt!r}: use labelstudio or argilla")
    result = Counts()
    with open_store(reannotations) as store:
        for action, entry in plan(store, incoming, overwrite):
            if action == "approve":
                approve_item(store, entry.source_id, entry.annotator, source=fmt)
                result.approved += 1
            elif action in ("write", "change"):
                save_item(store, entry.source_id, entry.annotator, entry.item, source=fmt)
                if action == "write":
                    result.written += 1
                else:
                    result.changed += 1
            else:
                result.unchanged += 1
    return result
