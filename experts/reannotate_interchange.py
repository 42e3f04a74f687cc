"""Re-annotation through Label Studio or Argilla: tasks out, the experts' new items back in.

The files follow ``qualification/interchange.py``. Label Studio: a JSON list of tasks
``{"id", "data"}`` with a config (XML) written next to it; its JSON export returns them with
``annotations[].result``. Argilla 2.x: the ``rg.Dataset.to_disk`` layout (``records.json``,
``.argilla/``); its records come back with ``responses``. An imported item passes the same checks as one written in
the page, and lands in the same store with its history; a different current item by the
same annotator is a conflict, and nothing is imported unless ``overwrite`` is given.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from experts.reannotate import DB_FILE, FilteredVideo, ReannotationStore, check_item, load_filtered
from qualification.labels import check_annotator
from vkr_core.files import atomic_write
from vkr_core.schemas import InputError

_TEXT_FIELDS = ("question", "options", "answer", "grounding")

CONFIG = """<View>
  <Header value="$source_id · $video_path"/>
  <Image name="frames" valueList="$frames"/>
  <Text name="frame_times" value="$frame_times"/>
  <Header value="Original question (filtered: answered from a single frame)"/>
  <Text name="original" value="$original"/>
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


def write_tasks(
    probe_out: str | Path,
    out: str | Path,
    frame_url_prefix: str = "",
    frames_dir: str | Path | None = None,
) -> tuple[Path, Path]:
    """Label Studio tasks for the probe's filtered questions, and the config beside them.

    A frame's URL is ``frame_url_prefix`` + its path under the probe's frames folder."""
    tasks = []
    for n, source in enumerate(load_filtered(probe_out, frames_dir), start=1):
        tasks.append(
            {
                "id": n,
                "data": {
                    "source_id": source.source_id,
                    "video_path": str(source.row["video_path"]),
                    "original": _original(source),
                    "frames": [
                        f"{frame_url_prefix}{path.parent.name}/{path.name}"
                        for _, path in source.frames
                    ],
                    "frame_times": ", ".join(f"{t:g}s" for t, _ in source.frames),
                },
            }
        )
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    _write(path, json.dumps(tasks, indent=1, ensure_ascii=False) + "\n")
    config = path.with_suffix(".xml")
    _write(config, CONFIG)
    return path, config


GUIDELINES = (
    "These questions were filtered from an evaluation set because one random frame answers "
    "them. Write a new question on the same video that needs the video: its options (one per "
    "line) or an open answer, the answer (an option letter, or the open answer) and the "
    "seconds of the frames that show it, comma separated."
)


def _text_question(name: str, title: str, required: bool) -> dict[str, Any]:
    return {
        "name": name,
        "title": title,
        "description": None,
        "required": required,
        "settings": {"type": "text", "use_markdown": False},
    }


def argilla_settings() -> dict[str, Any]:
    """The dataset Settings in the shape ``rg.Settings.to_json`` writes."""
    return {
        "guidelines": GUIDELINES,
        "fields": [
            {
                "name": n,
                "title": t,
                "required": True,
                "settings": {"type": "text", "use_markdown": md},
            }
            for n, t, md in (("frames", "Frames", True), ("original", "Original question", False))
        ],
        "questions": [
            _text_question("question", "New question", True),
            {
                "name": "problem_type",
                "title": "Type",
                "description": None,
                "required": True,
                "settings": {
                    "type": "label_selection",
                    "options": [
                        {"value": v, "text": v, "description": None}
                        for v in ("multiple-choice", "open-ended")
                    ],
                    "visible_options": None,
                },
            },
            _text_question("options", "Options, one per line", False),
            _text_question("answer", "Answer", True),
            _text_question("grounding", "Grounding seconds, comma separated", True),
        ],
        "vectors": [],
        "metadata": [
            {
                "name": n,
                "title": n,
                "settings": {"type": "terms", "values": None},
                "visible_for_annotators": True,
            }
            for n in ("source_id", "video_path", "dataset")
        ],
        "allow_extra_metadata": True,
    }


def write_argilla(
    probe_out: str | Path,
    out: str | Path,
    frame_url_prefix: str = "",
    frames_dir: str | Path | None = None,
) -> list[Path]:
    """An ``rg.Dataset.to_disk`` folder (records.json, .argilla/) of the filtered questions."""
    target = Path(out)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise InputError(
            f"{target} exists and is not an empty folder: Argilla exports are folders "
            "(records.json and .argilla/), like rg.Dataset.to_disk writes"
        )
    records = []
    for source in load_filtered(probe_out, frames_dir):
        frames = "\n".join(
            f"![{t:g}s]({frame_url_prefix}{path.parent.name}/{path.name})"
            for t, path in source.frames
        )
        records.append(
            {
                "id": source.source_id,
                "fields": {"frames": frames or "(no frames)", "original": _original(source)},
                "metadata": {
                    "source_id": source.source_id,
                    "video_path": str(source.row["video_path"]),
                    "dataset": str(source.row.get("dataset", "")),
                },
                "suggestions": {},
                "responses": {},
                "vectors": {},
                "_server_id": None,
            }
        )
    paths = [
        target / "records.json",
        target / ".argilla" / "settings.json",
        target / ".argilla" / "dataset.json",
    ]
    _write(paths[0], json.dumps(records, indent=1, ensure_ascii=False))
    _write(paths[1], json.dumps(argilla_settings(), indent=1))
    dataset = {
        "name": "vkr-reannotation",
        "guidelines": GUIDELINES,
        "allow_extra_metadata": True,
        "status": "ready",
    }
    _write(paths[2], json.dumps(dataset, indent=1))
    return paths


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, text)
    # Another user (a Label Studio or Argilla server) reads these: not the private 0600.
    path.chmod(0o644)


def _completed_by(value: Any) -> str:
    # Label Studio writes a user id, or a user object in fuller exports.
    if isinstance(value, dict):
        for key in ("email", "username"):
            if value.get(key):
                return check_annotator(str(value[key]))
        value = value.get("id")
    if isinstance(value, int) and not isinstance(value, bool):
        return f"labelstudio-user-{value}"
    if isinstance(value, str) and value.strip():
        return check_annotator(value)
    raise InputError(f"annotation has no usable completed_by ({value!r})")


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
class Imported:
    created: int = 0
    changed: int = 0
    unchanged: int = 0


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(f"label file not found: {path}") from None
    except json.JSONDecodeError as exc:
        raise InputError(f"{path} is not JSON: {exc}") from None


def _checked(source: FilteredVideo, body: dict[str, Any], where: str) -> dict[str, Any]:
    try:
        return check_item(source, body)
    except InputError as exc:
        raise InputError(f"{where}: {exc}") from None


def _body(texts: dict[str, str], problem_type: Any, where: str) -> dict[str, Any]:
    return {
        "question": texts.get("question", ""),
        "problem_type": problem_type,
        "options": texts.get("options", "").splitlines(),
        "answer": texts.get("answer", ""),
        "grounding": _grounding(texts.get("grounding", ""), where),
    }


# (source id, annotator, checked item, where it came from)
_Checked = list[tuple[str, str, dict[str, Any], str]]


def read_labelstudio(path: Path, sources: dict[str, FilteredVideo]) -> _Checked:
    tasks = _read_json(path)
    if not isinstance(tasks, list):
        raise InputError(f"{path} is not a Label Studio JSON export (a list of tasks)")
    checked: _Checked = []
    for t, task in enumerate(tasks):
        data = task.get("data") if isinstance(task, dict) else None
        if not isinstance(data, dict) or "source_id" not in data:
            raise InputError(f"{path} task {t}: no data.source_id (was it written by vkr?)")
        source = sources.get(str(data["source_id"]))
        if source is None:
            raise InputError(f"{path} task {t}: no filtered question {data['source_id']!r}")
        for a, annotation in enumerate(task.get("annotations") or []):
            if annotation.get("was_cancelled"):
                continue
            annotator = _completed_by(annotation.get("completed_by"))
            where = f"{path} task {task.get('id', t)} ({source.source_id}) annotation {a} by {annotator}"
            texts: dict[str, str] = {}
            problem_type = None
            for result in annotation.get("result") or []:
                value = result.get("value") or {}
                name = result.get("from_name")
                if name in _TEXT_FIELDS:
                    text = value.get("text") or []
                    texts[name] = "\n".join(text) if isinstance(text, list) else str(text)
                elif name == "problem_type":
                    problem_type = (value.get("choices") or [None])[0]
            item = _checked(source, _body(texts, problem_type, where), where)
            checked.append((source.source_id, annotator, item, where))
    return checked


def read_argilla(path: Path, sources: dict[str, FilteredVideo]) -> _Checked:
    """Items from Argilla records (an ``rg.Dataset.to_disk`` folder or its records.json)."""
    records_path = path / "records.json" if path.is_dir() else path
    records = _read_json(records_path)
    if not isinstance(records, list):
        raise InputError(f"{records_path} is not a list of Argilla records")
    checked: _Checked = []
    for r, record in enumerate(records):
        metadata = record.get("metadata") if isinstance(record, dict) else None
        if not isinstance(metadata, dict) or "source_id" not in metadata:
            raise InputError(f"{records_path} record {r}: no metadata.source_id (written by vkr?)")
        source = sources.get(str(metadata["source_id"]))
        if source is None:
            raise InputError(
                f"{records_path} record {r}: no filtered question {metadata['source_id']!r}"
            )
        by_user: dict[str, dict[str, Any]] = {}
        for question, answers in (record.get("responses") or {}).items():
            for answer in answers or []:
                user = check_annotator(str(answer.get("user_id") or ""))
                by_user.setdefault(user, {})[question] = answer.get("value")
        for user, answers in sorted(by_user.items()):
            where = f"{records_path} record {r} ({source.source_id}) by {user}"
            texts = {k: str(answers[k]) for k in _TEXT_FIELDS if answers.get(k) is not None}
            item = _checked(source, _body(texts, answers.get("problem_type"), where), where)
            checked.append((source.source_id, user, item, where))
    return checked


def import_labels(
    reannotations: str | Path,
    probe_out: str | Path,
    fmt: str,
    path: str | Path,
    overwrite: bool = False,
) -> Imported:
    """Read a Label Studio export or Argilla records into the store; every item is checked
    before any is written, so a bad one (named with where it came from) changes nothing."""
    sources = {s.source_id: s for s in load_filtered(probe_out)}
    if fmt == "labelstudio":
        checked = read_labelstudio(Path(path), sources)
    elif fmt == "argilla":
        checked = read_argilla(Path(path), sources)
    else:
        raise InputError(f"unknown label format {fmt!r}: use labelstudio or argilla")
    store = ReannotationStore(Path(reannotations) / DB_FILE)
    try:
        if not overwrite:
            for source_id, annotator, item, where in checked:
                mine = store.mine(annotator).get(source_id)
                if mine is not None and {k: mine[k] for k in item} != item:
                    raise InputError(
                        f"{where}: {annotator} already wrote a different item for {source_id}; "
                        "nothing was imported (pass --overwrite to replace it, history is kept)"
                    )
        result = Imported()
        for source_id, annotator, item, _ in checked:
            before = store.mine(annotator).get(source_id)
            after = store.save(source_id, annotator, item)
            if before is None:
                result.created += 1
            elif after["changes"] != before["changes"]:
                result.changed += 1
            else:
                result.unchanged += 1
        return result
    finally:
        store.close()
