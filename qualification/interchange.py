"""Round trips of pilot items and labels through Label Studio and Argilla 2.x files.

Label Studio: a JSON list of tasks ``{"id", "data": {...}, "predictions": [...]}`` plus a
labelling config (XML) written next to it; its JSON export returns the same tasks with
``annotations[].result``. Argilla 2.x: the layout of ``rg.Dataset.to_disk`` (``records.json``
plus ``.argilla/settings.json`` and ``.argilla/dataset.json``), so ``rg.Dataset.from_disk``
loads it; no argilla package is needed here. The formats' primitives are labelling.interchange's,
shared with the expert pages; this module keeps the pilot's config, fields and labels.

Imports never overwrite a label silently: a different current label by the same annotator
for the same item is a conflict, and nothing is imported unless ``overwrite`` is given (the
replaced labels stay in the history).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal
from xml.sax.saxutils import quoteattr

from labelling.interchange import (
    Imported,
    ImportedLabel,
    ImportReport,
    argilla_record,
    frame_urls,
    frames_markdown,
    label_question,
    ls_choice,
    ls_prediction,
    ls_text,
    read_argilla_records,
    read_labelstudio_tasks,
    settings,
    store_labels,
    suggestion,
    terms_metadata,
    text_field,
    text_question,
    write_argilla,
    write_text,
)
from qualification.labels import check_annotator, check_label
from qualification.models import AUTO_ANNOTATOR, CATEGORIES, PilotItem
from qualification.pilot import Pilot
from vkr_core.schemas import InputError

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
    return frame_urls([frame.path for frame in item.frames], prefix)


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
    result = [ls_choice("label", "output", SHOWN_LABELS[label])]
    if category:
        result.append(ls_choice("category", "output", category))
    if note:
        result.append(ls_text("note", "output", note))
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
                ls_prediction(_ls_result(auto.label, auto.category, auto.note), AUTO_AGENT)
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


def _label_value(value: Any, where: str) -> str:
    label = _READ_LABELS.get(str(value).strip().lower()) if value is not None else None
    if label is None:
        raise InputError(
            f"{where}: label {value!r} is not one of {', '.join(SHOWN_LABELS.values())}"
        )
    return label


def _imported_label(imported: Imported, missing: str) -> ImportedLabel:
    values = imported.values
    if values.get("label") is None:
        raise InputError(f"{imported.where} has no 'label' {missing}")
    return ImportedLabel(
        item_id=imported.item_id,
        annotator=imported.annotator,
        label=_label_value(values["label"], imported.where),
        category=values.get("category") or None,
        note=str(values.get("note") or ""),
        where=imported.where,
    )


def read_labelstudio(path: Path) -> tuple[set[str], list[ImportedLabel]]:
    """(pilot ids named, labels) from a Label Studio JSON export."""
    tasks, imported = read_labelstudio_tasks(path, "item_id")
    labels = [
        _imported_label(
            Imported(i.item_id, i.annotator, i.values, f"{i.where} by {i.annotator}"), "choice"
        )
        for i in imported
    ]
    return {str(data.get("pilot_id")) for data in tasks}, labels


# ---------------------------------------------------------------- Argilla 2.x


def argilla_settings(frames: bool = True) -> dict[str, Any]:
    """The dataset Settings in the shape ``rg.Settings.to_json`` writes (``frames``: the
    pilot shows some; a required field may not be empty, so a text step's has none)."""
    return settings(
        fields=([text_field("frames", "Frames", markdown=True)] if frames else [])
        + [text_field("prompt", "What the model saw"), text_field("output", "Model output")],
        questions=[
            label_question("label", "Is this output ok?", list(SHOWN_LABELS.values())),
            label_question("category", "Failure category", list(CATEGORIES), required=False),
            text_question("note", "Note"),
        ],
        metadata=[terms_metadata(n) for n in ARGILLA_METADATA],
        guidelines=GUIDELINES,
    )


def argilla_records(pilot: Pilot, frame_url_prefix: str = "") -> list[dict[str, Any]]:
    manifest = pilot.manifest
    with_frames = _has_frames(pilot)
    records = []
    for item in pilot.items:
        suggestions: dict[str, Any] = {}
        if item.auto_label:
            auto = item.auto_label
            suggestions = {
                "label": suggestion(SHOWN_LABELS[auto.label], AUTO_AGENT),
                "category": suggestion(auto.category, AUTO_AGENT),
                "note": suggestion(auto.note, AUTO_AGENT),
            }
        frames = frames_markdown(
            _frame_refs(item, frame_url_prefix),
            [frame.clock or frame.sha256[:12] for frame in item.frames],
        )
        fields = {"frames": frames or "(no frames)"} if with_frames else {}
        records.append(
            argilla_record(
                {**fields, "prompt": item.prompt, "output": format_output(item)},
                {
                    "item_id": item.item_id,
                    "pilot_id": manifest.pilot_id,
                    "step": manifest.step,
                    "model": manifest.model,
                    "skill": item.skill or "",
                    "source_item_id": item.source_item_id,
                    "discipline": item.discipline,
                },
                suggestions,
                record_id=item.item_id,
            )
        )
    return records


def read_argilla(path: Path) -> tuple[set[str], list[ImportedLabel]]:
    """(pilot ids named, labels) from Argilla records (a to_disk folder or records.json)."""
    records, imported = read_argilla_records(path, "item_id")
    labels = [_imported_label(i, "response") for i in imported]
    return {str(metadata.get("pilot_id")) for metadata in records}, labels


# ---------------------------------------------------------------- export / import


def export_labels(
    pilot: Pilot, fmt: str, out: str | Path, frame_url_prefix: str = ""
) -> list[Path]:
    """Write the pilot's items for a labelling tool; returns the files written."""
    target = Path(out)
    if fmt == "labelstudio":
        config = target.with_name(target.stem + ".config.xml")
        write_text(target, json.dumps(labelstudio_tasks(pilot, frame_url_prefix), indent=2))
        write_text(config, labelstudio_config(frames=_has_frames(pilot)))
        return [target, config]
    if fmt == "argilla":
        return write_argilla(
            target,
            pilot.manifest.pilot_id,
            argilla_settings(frames=_has_frames(pilot)),
            argilla_records(pilot, frame_url_prefix),
        )
    raise InputError(f"unknown label format {fmt!r}: use one of {', '.join(FORMATS)}")


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
    for lab in labels:
        lab.annotator = check_annotator(lab.annotator)
        if lab.annotator == AUTO_ANNOTATOR:
            raise InputError(f"{lab.where}: annotator name {AUTO_ANNOTATOR!r} is reserved")
        try:
            check_label(lab.label, lab.category, lab.note)
        except InputError as exc:
            raise InputError(f"{lab.where}: {exc}") from None
    with pilot.labels() as store:
        return store_labels(store, labels, source, fmt, overwrite=overwrite, shown=_describe)


def _describe(label: str, category: str | None) -> str:
    return SHOWN_LABELS[label] + (f"/{category}" if category else "")
