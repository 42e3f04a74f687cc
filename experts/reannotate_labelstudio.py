"""Re-annotation through Label Studio: tasks out, the experts' new items back in.

The tasks and labelling config follow ``qualification/interchange.py``: a JSON list of tasks
``{"id", "data"}`` with a config (XML) written next to it; Label Studio's JSON export returns
them with ``annotations[].result``. An imported item passes the same checks as one written in
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
    atomic_write(path, json.dumps(tasks, indent=1, ensure_ascii=False) + "\n")
    config = path.with_suffix(".xml")
    atomic_write(config, CONFIG)
    return path, config


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


def import_labelstudio(
    reannotations: str | Path,
    probe_out: str | Path,
    export_file: str | Path,
    overwrite: bool = False,
) -> Imported:
    """Read Label Studio's JSON export into the store; every item is checked before any is
    written, so a bad one (named by task and annotator) leaves the store as it was."""
    path = Path(export_file)
    try:
        tasks = json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(f"Label Studio export not found: {path}") from None
    except json.JSONDecodeError as exc:
        raise InputError(f"{path} is not JSON: {exc}") from None
    if not isinstance(tasks, list):
        raise InputError(f"{path} is not a Label Studio JSON export (a list of tasks)")
    sources = {s.source_id: s for s in load_filtered(probe_out)}
    checked: list[tuple[str, str, dict[str, Any], str]] = []
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
            where = f"{path} task {task.get('id', t)} ({source.source_id}) annotation {a}"
            annotator = _completed_by(annotation.get("completed_by"))
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
            body = {
                "question": texts.get("question", ""),
                "problem_type": problem_type,
                "options": texts.get("options", "").splitlines(),
                "answer": texts.get("answer", ""),
                "grounding": _grounding(texts.get("grounding", ""), where),
            }
            try:
                item = check_item(source, body)
            except InputError as exc:
                raise InputError(f"{where} by {annotator}: {exc}") from None
            checked.append((source.source_id, annotator, item, where))
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
