"""The audit's round trips through Label Studio and Argilla 2.x, in the pilot's shape
(``qualification/interchange.py``).

Label Studio: a JSON list of tasks ``{"id", "data": {...}}`` and the labelling config (XML)
beside it; its JSON export returns the tasks with ``annotations[].result`` holding the label
choice and an optional note. Argilla 2.x: the layout of ``rg.Dataset.to_disk``
(``records.json`` plus ``.argilla/settings.json`` and ``.argilla/dataset.json``), so
``rg.Dataset.from_disk`` loads it; its records come back with ``responses`` per user.

An import is all or nothing, and a label that differs from the one stored for the same
example and annotator is a conflict unless ``overwrite`` (the replaced label stays in the
history), whichever tool it comes from.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from xml.sax.saxutils import quoteattr

from experts.audit import LABEL_NAMES, LABELS, AuditItem, load_audit, open_labels
from labelling import interchange as tool
from labelling.store import check_annotator
from vkr_core.schemas import InputError

FORMATS: tuple[str, ...] = ("labelstudio", "argilla")
# What a tool gives back: the name an annotator saw, or the label itself.
_READ = {
    **{name: label for label, name in LABEL_NAMES.items()},
    **{label: label for label in LABELS},
}
GUIDELINES = (
    "Judge this accepted training example against its frames. ok: grounded and correct. "
    "not visually grounded: the question or answer does not depend on what the frames show. "
    "trace error that changes the answer: a reasoning step is wrong and the answer with it. "
    "unsupported step: a step claims something neither the frames nor standard domain "
    "knowledge support. Add a note when it helps."
)
# Metadata each Argilla record carries (terms an annotator can filter by).
ARGILLA_METADATA = (
    "item_id",
    "skill",
    "discipline",
    "generation_model",
    "trace_model",
    "video_id",
    "audit_source",
)


def _inner(text: str, tag: str) -> str:
    return text.removeprefix(f"<{tag}>").removesuffix(f"</{tag}>").strip()


def _question(item: AuditItem) -> str:
    example = item.example
    return example.question + "".join(f"\n{o}" for o in example.options or [])


def _frames(item: AuditItem, prefix: str) -> list[str]:
    return tool.frame_urls([f.path for f in item.frames], prefix)


# ---------------------------------------------------------------- Label Studio


def labelstudio_config() -> str:
    choices = "\n".join(f"    <Choice value={quoteattr(LABEL_NAMES[label])}/>" for label in LABELS)
    return f"""<View>
  <Header value="$item_id"/>
  <Image name="frames" valueList="$frames"/>
  <Text name="frame_times" value="$frame_times_text"/>
  <Header value="Question"/>
  <Text name="question" value="$question"/>
  <Header value="Answer"/>
  <Text name="answer" value="$answer"/>
  <Header value="Reasoning trace"/>
  <Text name="trace" value="$trace"/>
  <Choices name="label" toName="trace" choice="single-radio" required="true">
{choices}
  </Choices>
  <TextArea name="note" toName="trace" rows="3" maxSubmissions="1"/>
</View>
"""


def labelstudio_tasks(audit_dir: str | Path, frame_url_prefix: str = "") -> list[dict[str, Any]]:
    manifest, items = load_audit(audit_dir)
    tasks = []
    for number, item in enumerate(items, start=1):
        example = item.example
        tasks.append(
            {
                "id": number,
                "data": {
                    "item_id": item.item_id,
                    "audit_source": manifest.source,
                    "frames": _frames(item, frame_url_prefix),
                    "frame_times": [f.clock for f in item.frames],
                    "frame_times_text": " · ".join(f.clock for f in item.frames),
                    "question": _question(item),
                    "answer": _inner(example.solution, "answer"),
                    "trace": _inner(example.think, "think"),
                    "skill": example.skill,
                    "generation_model": item.generation_model,
                    "trace_model": item.trace_model,
                    "video_id": example.video_id,
                },
            }
        )
    return tasks


# ---------------------------------------------------------------- Argilla 2.x


def argilla_settings() -> dict[str, Any]:
    """The dataset settings: frames, question, answer and trace; one of the four labels
    (stored as the label, shown by name) and a note."""
    return tool.settings(
        fields=[
            tool.text_field("frames", "Frames", markdown=True),
            tool.text_field("question", "Question"),
            tool.text_field("answer", "Answer"),
            tool.text_field("trace", "Reasoning trace"),
        ],
        questions=[
            tool.label_question("label", "Is this example ok?", LABEL_NAMES),
            tool.text_question("note", "Note"),
        ],
        metadata=[tool.terms_metadata(name) for name in ARGILLA_METADATA],
        guidelines=GUIDELINES,
    )


def argilla_records(audit_dir: str | Path, frame_url_prefix: str = "") -> list[dict[str, Any]]:
    manifest, items = load_audit(audit_dir)
    records = []
    for item in items:
        example = item.example
        frames = tool.frames_markdown(
            _frames(item, frame_url_prefix), [f.clock for f in item.frames]
        )
        fields = {
            # A required field may not be empty: say so rather than leave it out.
            "frames": frames or "(no frames)",
            "question": _question(item),
            "answer": _inner(example.solution, "answer"),
            "trace": _inner(example.think, "think"),
        }
        metadata = {
            "item_id": item.item_id,
            "skill": example.skill,
            "discipline": example.discipline,
            "generation_model": item.generation_model,
            "trace_model": item.trace_model,
            "video_id": example.video_id,
            "audit_source": manifest.source,
        }
        records.append(tool.argilla_record(fields, metadata, record_id=item.item_id))
    return records


# ---------------------------------------------------------------- export / import


def export_labels(
    audit_dir: str | Path, fmt: str, out: str | Path, frame_url_prefix: str = ""
) -> list[Path]:
    """Write the audit's sampled examples for a labelling tool; returns the files written."""
    target = Path(out)
    if fmt == "labelstudio":
        config = target.with_name(target.stem + ".config.xml")
        tool.write_json(target, labelstudio_tasks(audit_dir, frame_url_prefix))
        tool.write_text(config, labelstudio_config())
        return [target, config]
    if fmt == "argilla":
        records = argilla_records(audit_dir, frame_url_prefix)
        return tool.write_argilla(target, f"vkr-audit-{target.name}", argilla_settings(), records)
    raise InputError(f"unknown label format {fmt!r}: use one of {', '.join(FORMATS)}")


def _checked(found: tool.Imported, what: str) -> tool.ImportedLabel:
    """One annotator's answers as an audit label: the four labels only, a note as text."""
    value = found.values.get("label")
    if value is None:
        raise InputError(f"{found.where} has no 'label' {what}")
    label = _READ.get(str(value).strip())
    if label is None:
        shown = ", ".join(LABEL_NAMES.values())
        raise InputError(f"{found.where}: label {value!r} is not one of {shown}")
    try:
        annotator = check_annotator(found.annotator)
    except InputError as exc:
        raise InputError(f"{found.where}: {exc}") from None
    note = found.values.get("note") or ""
    return tool.ImportedLabel(found.item_id, annotator, label, None, str(note), found.where)


def read_labels(fmt: str, path: Path) -> list[tool.ImportedLabel]:
    """The labels in a Label Studio JSON export or Argilla records (folder or records.json)."""
    if fmt == "labelstudio":
        found = tool.read_labelstudio(path, "item_id")
        for f in found:  # Argilla's say who already
            f.where = f"{f.where} by {f.annotator}"
        return [_checked(f, "choice") for f in found]
    if fmt == "argilla":
        return [_checked(f, "response") for f in tool.read_argilla(path, "item_id")]
    raise InputError(f"unknown label format {fmt!r}: use one of {', '.join(FORMATS)}")


def import_labels(
    audit_dir: str | Path, fmt: str, path: str | Path, overwrite: bool = False
) -> tool.ImportReport:
    """Store the labels of a Label Studio or Argilla export in the audit; all or nothing, a
    differing stored label a conflict unless ``overwrite`` (the old one stays in the history)."""
    source = Path(path)
    found = read_labels(fmt, source)
    _, items = load_audit(audit_dir)
    unknown = sorted({lab.item_id for lab in found} - {item.item_id for item in items})
    if unknown:
        raise InputError(
            f"{source} has labels for {len(unknown)} example(s) this audit did not sample: "
            + ", ".join(unknown[:5])
            + (" ..." if len(unknown) > 5 else "")
        )
    with open_labels(audit_dir) as store:
        return tool.store_labels(store, found, source, fmt, overwrite=overwrite, noun="example")
