"""The Label Studio and Argilla 2.x primitives every labelling page's export and import use.

Label Studio: a JSON list of tasks ``{"id", "data": {...}, "predictions": [...]}`` plus a
labelling config (XML) written next to it; its JSON export returns the same tasks with
``annotations[].result`` (``from_name``, ``to_name``, ``type``, ``value``). Argilla 2.x: the
layout of ``rg.Dataset.to_disk`` (``records.json`` plus ``.argilla/settings.json`` and
``.argilla/dataset.json``), so ``rg.Dataset.from_disk`` loads it; no argilla package is
needed here (tests/test_labelling_formats.py checks both against the real SDKs).

A page keeps its own config, fields and questions; a reader returns ``Imported`` rows, one
per annotator and item, with the values keyed by ``from_name`` / question name, and names
the file, task or record and annotation in every error.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import Any, Protocol

from labelling.store import Label, LabelChange
from vkr_core.files import atomic_write
from vkr_core.schemas import InputError

# ---------------------------------------------------------------- files


def read_json(path: Path, what: str) -> Any:
    """The JSON in ``path``; InputError "{what} not found: PATH" or "PATH is not JSON: ..."."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{what} not found: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{path} is not JSON: {exc}") from None


def write_text(path: Path, text: str) -> None:
    """Write an export file atomically, readable by other users."""
    atomic_write(Path(path), text)
    # A Label Studio or Argilla server running as another user reads these: not 0600.
    Path(path).chmod(0o644)


def write_json(path: Path, data: Any) -> None:
    """Write ``data`` as indented JSON, atomically, readable by other users."""
    write_text(path, json.dumps(data, indent=2, ensure_ascii=False))


def frame_urls(paths: Sequence[str | PurePath], prefix: str = "") -> list[str]:
    """Each frame's URL for a labelling tool: ``prefix`` + its relative path (``/`` always).

    The prefix is what the tool serves the export folder under, e.g. Label Studio's local
    files ``/data/local-files/?d=`` or an ``http://`` address; empty keeps the paths as they
    are (the tool resolves them itself).
    """
    return [prefix + PurePath(p).as_posix() for p in paths]


def frames_markdown(urls: Sequence[str], captions: Sequence[str | None] | None = None) -> str:
    """The frames as Markdown images, for an Argilla text field with ``use_markdown``."""
    names = captions or [None] * len(urls)
    return "\n".join(
        f"![{caption or PurePath(url).name}]({url})"
        for url, caption in zip(urls, names, strict=True)
    )


def completed_by(value: Any) -> str:
    """The annotator of a Label Studio annotation: ``completed_by`` is a user id, or a user
    object (email, username, id) in fuller exports."""
    if isinstance(value, dict):
        for key in ("email", "username", "id"):
            if value.get(key) not in (None, ""):
                return str(value[key]) if key != "id" else f"labelstudio-user-{value[key]}"
    if isinstance(value, int | str) and not isinstance(value, bool) and str(value).strip():
        return str(value).strip() if isinstance(value, str) else f"labelstudio-user-{value}"
    raise InputError(f"annotation has no usable completed_by ({value!r})")


@dataclass
class Imported:
    """One annotator's answers on one item, as a labelling tool exported them.

    ``values``: Label Studio ``from_name`` or Argilla question name -> the value (a choice,
    a list of choices for the names read as multi-choice, text). ``where``: the file, task or
    record and annotation, for error messages. ``task_data``: the task's ``data`` (Label
    Studio) or the record's fields and metadata (Argilla), as exported.
    """

    item_id: str
    annotator: str
    values: dict[str, Any]
    where: str
    task_data: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------- Label Studio


def ls_choice(from_name: str, to_name: str, value: str | Sequence[str]) -> dict[str, Any]:
    """A ``<Choices>`` result (for a prediction or an annotation): one choice or several."""
    choices = [value] if isinstance(value, str) else list(value)
    return {
        "from_name": from_name,
        "to_name": to_name,
        "type": "choices",
        "value": {"choices": choices},
    }


def ls_text(from_name: str, to_name: str, text: str | Sequence[str]) -> dict[str, Any]:
    """A ``<TextArea>`` result: the text (one entry per submission)."""
    texts = [text] if isinstance(text, str) else list(text)
    return {
        "from_name": from_name,
        "to_name": to_name,
        "type": "textarea",
        "value": {"text": texts},
    }


def ls_prediction(
    result: Sequence[dict[str, Any]], model_version: str, score: float = 1.0
) -> dict[str, Any]:
    """A task's prediction (a pre-label an annotator sees and may accept or change)."""
    return {"model_version": model_version, "score": score, "result": list(result)}


def _result_value(result: dict[str, Any], multi: Collection[str], where: str) -> Any:
    value = result.get("value")
    if not isinstance(value, dict):
        raise InputError(f"{where}: result {result.get('from_name')!r} has no value object")
    kind = result.get("type")
    if kind == "choices" or "choices" in value:
        choices = value.get("choices") or []
        if not isinstance(choices, list):
            raise InputError(f"{where}: {result.get('from_name')!r} choices are not a list")
        if result.get("from_name") in multi:
            return [str(c) for c in choices]
        return choices[0] if choices else None
    if kind == "textarea" or "text" in value:
        texts = value.get("text")
        if texts is None:
            return ""
        return "\n".join(str(t) for t in texts) if isinstance(texts, list) else str(texts)
    # Ratings, numbers, dates, ...: the one value they carry, or the whole value object.
    return next(iter(value.values())) if len(value) == 1 else value


def read_labelstudio_tasks(
    path: Path, key: str, multi: Collection[str] = ()
) -> tuple[list[dict[str, Any]], list[Imported]]:
    """(every task's ``data``, the annotations) of a Label Studio JSON export.

    ``key`` is the ``data`` field naming the item (the pilot's ``item_id``); ``multi`` names
    the ``from_name``s whose choices are read as a list. Cancelled (skipped) annotations are
    left out; an annotation without a usable ``completed_by`` is an InputError naming it.
    """
    path = Path(path)
    tasks = read_json(path, "label file")
    if not isinstance(tasks, list):
        raise InputError(f"{path} is not a Label Studio JSON export (a list of tasks)")
    datas: list[dict[str, Any]] = []
    imported: list[Imported] = []
    for t, task in enumerate(tasks):
        data = task.get("data") if isinstance(task, dict) else None
        if not isinstance(data, dict) or key not in data:
            raise InputError(f"{path} task {t}: no data.{key} (was it exported by vkr?)")
        datas.append(data)
        annotations = task["annotations"] if task.get("annotations") is not None else []
        if not isinstance(annotations, list):
            raise InputError(f"{path} task {task.get('id', t)}: annotations are not a list")
        for a, annotation in enumerate(annotations):
            where = f"{path} task {task.get('id', t)} (item {data[key]}) annotation {a}"
            if not isinstance(annotation, dict):
                raise InputError(f"{where} is not an object")
            if annotation.get("was_cancelled"):
                continue
            try:
                annotator = completed_by(annotation.get("completed_by"))
            except InputError as exc:
                raise InputError(f"{where}: {exc}") from None
            values: dict[str, Any] = {}
            results = annotation["result"] if annotation.get("result") is not None else []
            if not isinstance(results, list):
                raise InputError(f"{where} by {annotator}: result is not a list")
            for result in results:
                if not isinstance(result, dict) or not result.get("from_name"):
                    raise InputError(f"{where} by {annotator}: a result has no from_name")
                values[str(result["from_name"])] = _result_value(
                    result, multi, f"{where} by {annotator}"
                )
            imported.append(Imported(str(data[key]), annotator, values, where, data))
    return datas, imported


def read_labelstudio(path: Path, key: str, multi: Collection[str] = ()) -> list[Imported]:
    """The annotations of a Label Studio JSON export (see ``read_labelstudio_tasks``)."""
    return read_labelstudio_tasks(path, key, multi)[1]


# ---------------------------------------------------------------- Argilla 2.x
# The shapes ``rg.Settings.to_json`` and ``rg.Record.to_dict`` write (argilla 2.x).


def text_field(
    name: str, title: str, *, markdown: bool = False, required: bool = True
) -> dict[str, Any]:
    """A text field a record shows (``markdown``: rendered, e.g. the frames as images)."""
    return {
        "name": name,
        "title": title,
        "required": required,
        "settings": {"type": "text", "use_markdown": markdown},
    }


def _options(labels: Sequence[str] | Mapping[str, str]) -> list[dict[str, Any]]:
    shown = labels if isinstance(labels, Mapping) else {label: label for label in labels}
    return [{"value": value, "text": text, "description": None} for value, text in shown.items()]


def _selection(
    kind: str,
    name: str,
    title: str,
    labels: Sequence[str] | Mapping[str, str],
    required: bool,
    description: str | None,
    **settings: Any,
) -> dict[str, Any]:
    return {
        "name": name,
        "title": title,
        "description": description,
        "required": required,
        "settings": {
            "type": kind,
            "options": _options(labels),
            "visible_options": None,
            **settings,
        },
    }


def label_question(
    name: str,
    title: str,
    labels: Sequence[str] | Mapping[str, str],
    *,
    required: bool = True,
    description: str | None = None,
) -> dict[str, Any]:
    """One choice among ``labels`` (or value -> shown text)."""
    return _selection("label_selection", name, title, labels, required, description)


def multi_label_question(
    name: str,
    title: str,
    labels: Sequence[str] | Mapping[str, str],
    *,
    required: bool = False,
    description: str | None = None,
) -> dict[str, Any]:
    """Any number of ``labels``; its response value is a list."""
    return _selection(
        "multi_label_selection", name, title, labels, required, description, options_order="natural"
    )


def text_question(
    name: str,
    title: str,
    *,
    required: bool = False,
    markdown: bool = False,
    description: str | None = None,
) -> dict[str, Any]:
    """Free text an annotator writes (a note, a corrected answer)."""
    return {
        "name": name,
        "title": title,
        "description": description,
        "required": required,
        "settings": {"type": "text", "use_markdown": markdown},
    }


def terms_metadata(name: str, title: str | None = None) -> dict[str, Any]:
    """A metadata property annotators can filter records by."""
    return {
        "name": name,
        "title": title or name,
        "settings": {"type": "terms", "values": None},
        "visible_for_annotators": True,
    }


def settings(
    fields: Sequence[dict[str, Any]],
    questions: Sequence[dict[str, Any]],
    metadata: Sequence[dict[str, Any]],
    guidelines: str,
) -> dict[str, Any]:
    """A dataset's settings (``.argilla/settings.json``)."""
    return {
        "guidelines": guidelines,
        "fields": list(fields),
        "questions": list(questions),
        "vectors": [],
        "metadata": list(metadata),
        "allow_extra_metadata": True,
    }


def suggestion(value: Any, agent: str, score: float = 1.0) -> dict[str, Any]:
    """A pre-filled answer to a question (an Argilla suggestion)."""
    return {"value": value, "score": score, "agent": agent}


def argilla_record(
    fields: dict[str, Any],
    metadata: dict[str, Any],
    suggestions: dict[str, Any] | None = None,
    *,
    record_id: str | None = None,
) -> dict[str, Any]:
    """One record of ``records.json``: its fields, metadata and suggestions (question name ->
    ``suggestion(...)``), no responses yet."""
    return {
        "id": record_id,
        "fields": fields,
        "metadata": metadata,
        "suggestions": suggestions or {},
        "responses": {},
        "vectors": {},
        "_server_id": None,
    }


def write_argilla(
    target: Path, name: str, dataset_settings: dict[str, Any], records: Sequence[dict[str, Any]]
) -> list[Path]:
    """Write the ``rg.Dataset.to_disk`` layout into ``target`` (absent or an empty folder);
    returns the files written."""
    target = Path(target)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise InputError(
            f"{target} exists and is not an empty folder: Argilla exports are folders "
            "(records.json and .argilla/), like rg.Dataset.to_disk writes"
        )
    records_path = target / "records.json"
    settings_path = target / ".argilla" / "settings.json"
    dataset_path = target / ".argilla" / "dataset.json"
    write_json(records_path, list(records))
    write_json(settings_path, dataset_settings)
    write_json(
        dataset_path,
        {
            "name": name,
            "guidelines": dataset_settings.get("guidelines"),
            "allow_extra_metadata": dataset_settings.get("allow_extra_metadata", True),
            "status": "ready",
        },
    )
    return [records_path, settings_path, dataset_path]


def read_argilla_records(path: Path, key: str) -> tuple[list[dict[str, Any]], list[Imported]]:
    """(every record's metadata, the responses) of Argilla records: a ``to_disk`` folder or
    its ``records.json``. ``key`` is the metadata field naming the item; responses are
    grouped per ``user_id``, one ``Imported`` per (record, user)."""
    path = Path(path)
    records_path = path / "records.json" if path.is_dir() else path
    records = read_json(records_path, "label file")
    if not isinstance(records, list):
        raise InputError(f"{records_path} is not a list of Argilla records")
    metadatas: list[dict[str, Any]] = []
    imported: list[Imported] = []
    for r, record in enumerate(records):
        metadata = record.get("metadata") if isinstance(record, dict) else None
        if not isinstance(metadata, dict) or key not in metadata:
            raise InputError(f"{records_path} record {r}: no metadata.{key} (exported by vkr?)")
        metadatas.append(metadata)
        item_id = str(metadata[key])
        responses = record["responses"] if record.get("responses") is not None else {}
        if not isinstance(responses, dict):
            raise InputError(
                f"{records_path} record {r} (item {item_id}): responses are not an object"
            )
        by_user: dict[str, dict[str, Any]] = {}
        for question, answers in responses.items():
            if not isinstance(answers, list):
                raise InputError(
                    f"{records_path} record {r} (item {item_id}): {question!r} responses are"
                    " not a list"
                )
            for answer in answers:
                user = str(answer.get("user_id") or "").strip() if isinstance(answer, dict) else ""
                if not user:
                    raise InputError(
                        f"{records_path} record {r} (item {item_id}): a {question!r} response"
                        " has no user_id"
                    )
                # A draft or discarded response is not a label. Argilla's own to_disk drops
                # the status (records.json keeps value and user_id only), so an export meant
                # for vkr should be filtered to submitted responses; where it is kept, it
                # decides.
                if answer.get("status", "submitted") != "submitted":
                    continue
                by_user.setdefault(user, {})[question] = answer.get("value")
        fields = record.get("fields") if isinstance(record.get("fields"), dict) else {}
        for user, values in sorted(by_user.items()):
            where = f"{records_path} record {r} (item {item_id}) by {user}"
            imported.append(Imported(item_id, user, values, where, {**fields, **metadata}))
    return metadatas, imported


def read_argilla(path: Path, key: str) -> list[Imported]:
    """The responses of Argilla records (see ``read_argilla_records``)."""
    return read_argilla_records(path, key)[1]


# ---------------------------------------------------------------- labels back into a store


@dataclass
class ImportedLabel:
    """One label read from a tool's export, checked by its page (``where``: for errors)."""

    item_id: str
    annotator: str
    label: str
    category: str | None
    note: str
    where: str


class LabelStoreLike(Protocol):
    """A ``LabelHistory``, or a page's binding of one (the pilot's ``LabelStore``)."""

    def get(self, item_id: str, annotator: str) -> Label | None: ...

    def set(
        self,
        item_id: str,
        annotator: str,
        label: str,
        category: str | None = None,
        note: str = "",
        source: str = "web",
    ) -> LabelChange: ...


@dataclass
class ImportReport:
    created: int = 0
    changed: int = 0
    unchanged: int = 0
    annotators: list[str] = field(default_factory=list)


def _shown(label: str, category: str | None) -> str:
    return label + (f"/{category}" if category else "")


def store_labels(
    store: LabelStoreLike,
    labels: Sequence[ImportedLabel],
    source: Path,
    tool: str,
    *,
    overwrite: bool = False,
    noun: str = "item",
    shown: Callable[[str, str | None], str] = _shown,
) -> ImportReport:
    """Store a tool's labels, all or nothing: two different labels by one annotator for one
    item in the file, or a label that differs from the one stored, is an InputError and
    nothing is stored, unless ``overwrite`` replaces stored ones (the old stay in the
    history). ``noun`` names an item in errors, ``shown`` a label and category."""
    seen: dict[tuple[str, str], ImportedLabel] = {}
    for lab in labels:
        earlier = seen.get((lab.item_id, lab.annotator))
        if earlier and (earlier.label, earlier.category, earlier.note) != (
            lab.label,
            lab.category,
            lab.note,
        ):
            raise InputError(
                f"{source} has two different labels by {lab.annotator} for {noun} "
                f"{lab.item_id} ({earlier.where}; {lab.where}): keep one"
            )
        seen[(lab.item_id, lab.annotator)] = lab
    conflicts = []
    for (item_id, annotator), lab in seen.items():
        current = store.get(item_id, annotator)
        if current and (current.label, current.category, current.note) != (
            lab.label,
            lab.category,
            lab.note,
        ):
            conflicts.append(
                f"{noun} {item_id} by {annotator}: stored "
                f"{shown(current.label, current.category)}, file {shown(lab.label, lab.category)}"
            )
    if conflicts and not overwrite:
        raise InputError(
            f"{len(conflicts)} label(s) in {source} differ from labels already stored "
            f"({'; '.join(conflicts[:5])}{' ...' if len(conflicts) > 5 else ''}): nothing "
            "was imported. Use --overwrite to replace them (the old labels stay in the history)"
        )
    report = ImportReport(annotators=sorted({a for _, a in seen}))
    for (item_id, annotator), lab in seen.items():
        change = store.set(item_id, annotator, lab.label, lab.category, lab.note, source=tool)
        setattr(report, change.status, getattr(report, change.status) + 1)
    return report
