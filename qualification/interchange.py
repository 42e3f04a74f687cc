"""Round trips of pilot items and labels through Label Studio and Argilla 2.x files.

Label Studio: a JSON list of tasks ``{"id", "data": {...}, "predictions": [...]}`` plus a
labelling config (XML) written next to it; its JSON export returns the same tasks with
``annotations[].result``. Argilla 2.x: the layout of ``rg.Dataset.to_disk`` (``records.json``
plus ``.argilla/settings.json`` and ``.argilla/dataset.json``), so ``rg.Dataset.from_disk``
loads it; no argilla package is needed here.

Imports never overwrite a label silently: a different current label by the same annotator
for the same item is a conflict, and nothing is imported unless ``overwrite`` is given (the
replaced labels stay in the history).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from xml.sax.saxutils import quoteattr

from qualification.labels import check_annotator, check_label
from qualification.models import AUTO_ANNOTATOR, CATEGORIES, PilotItem
from qualification.pilot import Pilot
from vkr_core.schemas import InputError
from vkr_core.store import atomic_write

Format = Literal["labelstudio", "argilla"]
FORMATS: tuple[str, ...] = ("labelstudio", "argilla")

# What an annotator sees in either tool; "ok"/"hard"/"soft" are accepted back too.
SHOWN_LABELS = {"ok": "ok", "hard": "hard failure", "soft": "soft failure"}
_READ_LABELS = {
    **{v: k for k, v in SHOWN_LABELS.items()},
    "ok": "ok",
    "hard": "hard",
    "soft": "soft",
}
AUTO_AGENT = "vkr-auto-compliance-check"
# Metadata each Argilla record carries (terms an annotator can filter by).
ARGILLA_METADATA = ("item_id", "pilot_id", "step", "model", "skill", "source_item_id", "discipline")
GUIDELINES = (
    "Judge the model's output for this pipeline step. ok: usable as is. hard failure: a "
    "compliance failure (broken or wrong-shaped JSON, missing fields, a refusal). soft failure: "
    "a content failure (hallucinated evidence, an unsupported reasoning step, a wrong answer). "
    "Give a category for every failure and a note when it helps. Items vkr already found to be "
    "hard failures are pre-labelled."
)


def _write(path: Path, text: str) -> None:
    atomic_write(path, text)
    # Another user (a Label Studio or Argilla server) reads these: not the private 0600.
    path.chmod(0o644)


def format_output(item: PilotItem) -> str:
    """The model's output as readable text: one field per line, lists numbered."""
    if item.parsed is None:
        reason = item.error or "no reply"
        return f"[{item.outcome}: {reason}]\n\nraw reply:\n{item.output or ''}"
    return "\n".join(_format_value(k, v, 0) for k, v in item.parsed.items())


def _format_value(key: str, value: Any, depth: int) -> str:
    pad = "  " * depth
    if isinstance(value, list):
        lines = [f"{pad}{key}:"]
        for i, element in enumerate(value, start=1):
            if isinstance(element, dict):
                inner = "; ".join(f"{k}: {v}" for k, v in element.items() if v not in ("", None))
                lines.append(f"{pad}  {i}. {inner}")
            else:
                lines.append(f"{pad}  {i}. {element}")
        return "\n".join(lines)
    if isinstance(value, dict):
        return "\n".join(
            [f"{pad}{key}:"] + [_format_value(k, v, depth + 1) for k, v in value.items()]
        )
    return f"{pad}{key}: {value}"


def _frame_refs(item: PilotItem, prefix: str) -> list[str]:
    return [prefix + frame.path for frame in item.frames]


# ---------------------------------------------------------------- Label Studio


def _has_frames(pilot: Pilot) -> bool:
    """Whether the pilot's step shows frames: a text step's pilot gets no frames section."""
    return any(item.frames for item in pilot.items)


def labelstudio_config(frames: bool = True) -> str:
    """The labelling config matching the exported tasks (``frames``: the pilot shows some)."""
    choices = "\n".join(
        f"    <Choice value={quoteattr(shown)}/>" for shown in SHOWN_LABELS.values()
    )
    categories = "\n".join(f"    <Choice value={quoteattr(c)}/>" for c in CATEGORIES)
    # An Image with an empty valueList is an empty box above every text step's item.
    image = '\n  <Image name="frames" valueList="$frames"/>' if frames else ""
    return f"""<View>
  <Header value="$item_id"/>{image}
  <Header value="What the model saw"/>
  <Text name="prompt" value="$prompt"/>
  <Header value="Model output"/>
  <Text name="output" value="$output"/>
  <Choices name="label" toName="output" choice="single-radio" required="true">
{choices}
  </Choices>
  <Choices name="category" toName="output" choice="single-radio">
{categories}
  </Choices>
  <TextArea name="note" toName="output" rows="3" maxSubmissions="1"/>
</View>
"""


def _ls_result(label: str, category: str | None, note: str) -> list[dict[str, Any]]:
    result: list[dict[str, Any]] = [
        {
            "from_name": "label",
            "to_name": "output",
            "type": "choices",
            "value": {"choices": [SHOWN_LABELS[label]]},
        }
    ]
    if category:
        result.append(
            {
                "from_name": "category",
                "to_name": "output",
                "type": "choices",
                "value": {"choices": [category]},
            }
        )
    if note:
        result.append(
            {
                "from_name": "note",
                "to_name": "output",
                "type": "textarea",
                "value": {"text": [note]},
            }
        )
    return result


def labelstudio_tasks(pilot: Pilot, frame_url_prefix: str = "") -> list[dict[str, Any]]:
    manifest = pilot.manifest
    with_frames = _has_frames(pilot)
    tasks = []
    for item in pilot.items:
        predictions = []
        if item.auto_label:
            auto = item.auto_label
            predictions.append(
                {
                    "model_version": AUTO_AGENT,
                    "score": 1.0,
                    "result": _ls_result(auto.label, auto.category, auto.note),
                }
            )
        data: dict[str, Any] = {}
        if item.video_id:
            data["video"] = item.video_path or item.video_id
        if with_frames:  # the config's Image reads $frames: every task of the pilot has it
            data["frames"] = _frame_refs(item, frame_url_prefix)
            data["frame_times"] = [f.clock for f in item.frames]
        data |= {
            "prompt": item.prompt,
            "output": format_output(item),
            "item_id": item.item_id,
            "source_item_id": item.source_item_id,
            "pilot_id": manifest.pilot_id,
            "step": manifest.step,
            "model": manifest.model,
            "skill": item.skill,
            "discipline": item.discipline,
            "subject": item.subject,
        }
        tasks.append({"id": item.index + 1, "data": data, "predictions": predictions})
    return tasks


def _completed_by(value: Any) -> str:
    # Label Studio writes a user id, or a user object in fuller exports.
    if isinstance(value, dict):
        for key in ("email", "username", "id"):
            if value.get(key) not in (None, ""):
                return str(value[key]) if key != "id" else f"labelstudio-user-{value[key]}"
    if isinstance(value, int | str) and str(value).strip():
        return str(value) if isinstance(value, str) else f"labelstudio-user-{value}"
    raise InputError(f"annotation has no usable completed_by ({value!r})")


@dataclass
class ImportedLabel:
    item_id: str
    annotator: str
    label: str
    category: str | None
    note: str
    where: str


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise InputError(f"label file not found: {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise InputError(f"{path} is not JSON: {exc}") from None


def _label_value(value: Any, where: str) -> str:
    label = _READ_LABELS.get(str(value).strip().lower()) if value is not None else None
    if label is None:
        raise InputError(
            f"{where}: label {value!r} is not one of {', '.join(SHOWN_LABELS.values())}"
        )
    return label


def read_labelstudio(path: Path) -> tuple[set[str], list[ImportedLabel]]:
    """(pilot ids named, labels) from a Label Studio JSON export."""
    tasks = _read_json(path)
    if not isinstance(tasks, list):
        raise InputError(f"{path} is not a Label Studio JSON export (a list of tasks)")
    pilots: set[str] = set()
    labels = []
    for t, task in enumerate(tasks):
        data = task.get("data") if isinstance(task, dict) else None
        if not isinstance(data, dict) or "item_id" not in data:
            raise InputError(f"{path} task {t}: no data.item_id (was it exported by vkr?)")
        pilots.add(str(data.get("pilot_id")))
        for a, annotation in enumerate(task.get("annotations") or []):
            if annotation.get("was_cancelled"):
                continue
            where = f"{path} task {task.get('id', t)} (item {data['item_id']}) annotation {a}"
            annotator = _completed_by(annotation.get("completed_by"))
            values: dict[str, Any] = {}
            for result in annotation.get("result") or []:
                value = result.get("value") or {}
                if result.get("from_name") in ("label", "category"):
                    choices = value.get("choices") or []
                    values[result["from_name"]] = choices[0] if choices else None
                elif result.get("from_name") == "note":
                    texts = value.get("text") or []
                    values["note"] = "\n".join(texts) if isinstance(texts, list) else str(texts)
            if values.get("label") is None:
                raise InputError(f"{where} by {annotator} has no 'label' choice")
            labels.append(
                ImportedLabel(
                    item_id=str(data["item_id"]),
                    annotator=annotator,
                    label=_label_value(values["label"], where),
                    category=values.get("category"),
                    note=values.get("note", ""),
                    where=where,
                )
            )
    return pilots, labels


# ---------------------------------------------------------------- Argilla 2.x


def argilla_settings(frames: bool = True) -> dict[str, Any]:
    """The dataset Settings in the shape ``rg.Settings.to_json`` writes (``frames``: the
    pilot shows some; a required field may not be empty, so a text step's has none)."""

    def label_question(name: str, title: str, labels: list[str], required: bool) -> dict[str, Any]:
        return {
            "name": name,
            "title": title,
            "description": None,
            "required": required,
            "settings": {
                "type": "label_selection",
                "options": [{"value": v, "text": v, "description": None} for v in labels],
                "visible_options": None,
            },
        }

    def text_field(name: str, title: str, markdown: bool = False) -> dict[str, Any]:
        return {
            "name": name,
            "title": title,
            "required": True,
            "settings": {"type": "text", "use_markdown": markdown},
        }

    def terms(name: str) -> dict[str, Any]:
        return {
            "name": name,
            "title": name,
            "settings": {"type": "terms", "values": None},
            "visible_for_annotators": True,
        }

    return {
        "guidelines": GUIDELINES,
        "fields": ([text_field("frames", "Frames", markdown=True)] if frames else [])
        + [
            text_field("prompt", "What the model saw"),
            text_field("output", "Model output"),
        ],
        "questions": [
            label_question("label", "Is this output ok?", list(SHOWN_LABELS.values()), True),
            label_question("category", "Failure category", list(CATEGORIES), False),
            {
                "name": "note",
                "title": "Note",
                "description": None,
                "required": False,
                "settings": {"type": "text", "use_markdown": False},
            },
        ],
        "vectors": [],
        "metadata": [terms(n) for n in ARGILLA_METADATA],
        "allow_extra_metadata": True,
    }


def argilla_records(pilot: Pilot, frame_url_prefix: str = "") -> list[dict[str, Any]]:
    manifest = pilot.manifest
    with_frames = _has_frames(pilot)
    records = []
    for item in pilot.items:
        suggestions: dict[str, Any] = {}
        if item.auto_label:
            auto = item.auto_label
            suggestions = {
                "label": {"value": SHOWN_LABELS[auto.label], "score": 1.0, "agent": AUTO_AGENT},
                "category": {"value": auto.category, "score": 1.0, "agent": AUTO_AGENT},
                "note": {"value": auto.note, "score": 1.0, "agent": AUTO_AGENT},
            }
        frames = "\n".join(
            f"![{frame.clock or frame.sha256[:12]}]({ref})"
            for frame, ref in zip(item.frames, _frame_refs(item, frame_url_prefix), strict=True)
        )
        fields = {"frames": frames or "(no frames)"} if with_frames else {}
        records.append(
            {
                "id": item.item_id,
                "fields": {
                    **fields,
                    "prompt": item.prompt,
                    "output": format_output(item),
                },
                "metadata": {
                    "item_id": item.item_id,
                    "pilot_id": manifest.pilot_id,
                    "step": manifest.step,
                    "model": manifest.model,
                    "skill": item.skill or "",
                    "source_item_id": item.source_item_id,
                    "discipline": item.discipline,
                },
                "suggestions": suggestions,
                "responses": {},
                "vectors": {},
                "_server_id": None,
            }
        )
    return records


def read_argilla(path: Path) -> tuple[set[str], list[ImportedLabel]]:
    """(pilot ids named, labels) from Argilla records (a to_disk folder or records.json)."""
    records_path = path / "records.json" if path.is_dir() else path
    records = _read_json(records_path)
    if not isinstance(records, list):
        raise InputError(f"{records_path} is not a list of Argilla records")
    pilots: set[str] = set()
    labels = []
    for r, record in enumerate(records):
        metadata = record.get("metadata") if isinstance(record, dict) else None
        if not isinstance(metadata, dict) or "item_id" not in metadata:
            raise InputError(f"{records_path} record {r}: no metadata.item_id (exported by vkr?)")
        pilots.add(str(metadata.get("pilot_id")))
        by_user: dict[str, dict[str, Any]] = {}
        for question, answers in (record.get("responses") or {}).items():
            for answer in answers or []:
                user = str(answer.get("user_id") or "").strip()
                if not user:
                    raise InputError(
                        f"{records_path} record {r} (item {metadata['item_id']}): a "
                        f"{question!r} response has no user_id"
                    )
                by_user.setdefault(user, {})[question] = answer.get("value")
        for user, answers in sorted(by_user.items()):
            where = f"{records_path} record {r} (item {metadata['item_id']}) by {user}"
            if answers.get("label") is None:
                raise InputError(f"{where} has no 'label' response")
            labels.append(
                ImportedLabel(
                    item_id=str(metadata["item_id"]),
                    annotator=user,
                    label=_label_value(answers["label"], where),
                    category=answers.get("category") or None,
                    note=str(answers.get("note") or ""),
                    where=where,
                )
            )
    return pilots, labels


# ---------------------------------------------------------------- export / import


def export_labels(
    pilot: Pilot, fmt: str, out: str | Path, frame_url_prefix: str = ""
) -> list[Path]:
    """Write the pilot's items for a labelling tool; returns the files written."""
    target = Path(out)
    if fmt == "labelstudio":
        config = target.with_name(target.stem + ".config.xml")
        _write(target, json.dumps(labelstudio_tasks(pilot, frame_url_prefix), indent=2))
        _write(config, labelstudio_config(frames=_has_frames(pilot)))
        return [target, config]
    if fmt == "argilla":
        if target.exists() and (not target.is_dir() or any(target.iterdir())):
            raise InputError(
                f"{target} exists and is not an empty folder: Argilla exports are folders "
                "(records.json and .argilla/), like rg.Dataset.to_disk writes"
            )
        records = target / "records.json"
        settings = target / ".argilla" / "settings.json"
        dataset = target / ".argilla" / "dataset.json"
        _write(records, json.dumps(argilla_records(pilot, frame_url_prefix), indent=2))
        _write(settings, json.dumps(argilla_settings(frames=_has_frames(pilot)), indent=2))
        _write(
            dataset,
            json.dumps(
                {
                    "name": pilot.manifest.pilot_id,
                    "guidelines": GUIDELINES,
                    "allow_extra_metadata": True,
                    "status": "ready",
                },
                indent=2,
            ),
        )
        return [records, settings, dataset]
    raise InputError(f"unknown label format {fmt!r}: use one of {', '.join(FORMATS)}")


@dataclass
class ImportReport:
    created: int = 0
    changed: int = 0
    unchanged: int = 0
    annotators: list[str] = field(default_factory=list)


def import_labels(
    pilot: Pilot, fmt: str, path: str | Path, overwrite: bool = False
) -> ImportReport:
    """Store the labels of a labelling tool's export; all or nothing."""
    source = Path(path)
    if fmt == "labelstudio":
        pilots, labels = read_labelstudio(source)
    elif fmt == "argilla":
        pilots, labels = read_argilla(source)
    else:
        raise InputError(f"unknown label format {fmt!r}: use one of {', '.join(FORMATS)}")
    pilot_id = pilot.manifest.pilot_id
    foreign = sorted(pilots - {pilot_id})
    if foreign:
        raise InputError(
            f"{source} is an export of pilot {', '.join(foreign)}, not of pilot {pilot_id} "
            f"({pilot.root}): import it into the pilot it came from"
        )
    known = {item.item_id for item in pilot.items}
    unknown = sorted({lab.item_id for lab in labels} - known)
    if unknown:
        raise InputError(
            f"{source} has labels for {len(unknown)} item(s) that pilot {pilot_id} does not "
            f"have: {', '.join(unknown[:5])}" + (" ..." if len(unknown) > 5 else "")
        )
    seen: dict[tuple[str, str], ImportedLabel] = {}
    for lab in labels:
        lab.annotator = check_annotator(lab.annotator)
        if lab.annotator == AUTO_ANNOTATOR:
            raise InputError(f"{lab.where}: annotator name {AUTO_ANNOTATOR!r} is reserved")
        try:
            check_label(lab.label, lab.category, lab.note)
        except InputError as exc:
            raise InputError(f"{lab.where}: {exc}") from None
        key = (lab.item_id, lab.annotator)
        earlier = seen.get(key)
        if earlier and (earlier.label, earlier.category, earlier.note) != (
            lab.label,
            lab.category,
            lab.note,
        ):
            raise InputError(
                f"{source} has two different labels by {lab.annotator} for item {lab.item_id} "
                f"({earlier.where}; {lab.where}): keep one"
            )
        seen[key] = lab
    report = ImportReport(annotators=sorted({a for _, a in seen}))
    with pilot.labels() as store:
        conflicts = []
        for (item_id, annotator), lab in seen.items():
            current = store.get(item_id, annotator)
            if current and (current.label, current.category, current.note) != (
                lab.label,
                lab.category,
                lab.note,
            ):
                conflicts.append(
                    f"item {item_id} by {annotator}: stored {_describe(current.label, current.category)}"
                    f", file {_describe(lab.label, lab.category)}"
                )
        if conflicts and not overwrite:
            raise InputError(
                f"{len(conflicts)} label(s) in {source} differ from labels already stored "
                f"({'; '.join(conflicts[:5])}{' ...' if len(conflicts) > 5 else ''}): nothing "
                "was imported. Use --overwrite to replace them (the old labels stay in the history)"
            )
        for (item_id, annotator), lab in seen.items():
            change = store.set(item_id, annotator, lab.label, lab.category, lab.note, source=fmt)
            setattr(report, change.status, getattr(report, change.status) + 1)
    return report


def _describe(label: str, category: str | None) -> str:
    return SHOWN_LABELS[label] + (f"/{category}" if category else "")
