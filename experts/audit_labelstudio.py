"""The audit's round trip through Label Studio, in the shape of ``qualification/interchange.py``.

Out: a JSON list of tasks ``{"id", "data": {...}}`` and the labelling config (XML) beside it.
Back: Label Studio's JSON export of those tasks, ``annotations[].result`` holding the label
choice and an optional note. An import is all or nothing, and a label that differs from the
one stored for the same example and annotator is a conflict unless ``overwrite`` (the
replaced label stays in the history).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from xml.sax.saxutils import quoteattr

from experts.audit import LABEL_NAMES, LABELS, AuditLabels, AuditLayout, check_annotator, load_audit
from qualification.interchange import _completed_by
from vkr_core.files import atomic_write
from vkr_core.schemas import InputError

_READ = {
    **{name: label for label, name in LABEL_NAMES.items()},
    **{label: label for label in LABELS},
}


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


def _inner(text: str, tag: str) -> str:
    return text.removeprefix(f"<{tag}>").removesuffix(f"</{tag}>").strip()


def labelstudio_tasks(audit_dir: str | Path, frame_url_prefix: str = "") -> list[dict[str, Any]]:
    manifest, items = load_audit(audit_dir)
    tasks = []
    for number, item in enumerate(items, start=1):
        example = item.example
        question = example.question + "".join(f"\n{o}" for o in example.options or [])
        tasks.append(
            {
                "id": number,
                "data": {
                    "item_id": item.item_id,
                    "audit_source": manifest.source,
                    "frames": [frame_url_prefix + f.path for f in item.frames],
                    "frame_times": [f.clock for f in item.frames],
                    "frame_times_text": " · ".join(f.clock for f in item.frames),
                    "question": question,
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


def export_labelstudio(
    audit_dir: str | Path, out: str | Path, frame_url_prefix: str = ""
) -> list[Path]:
    target = Path(out)
    config = target.with_name(target.stem + ".config.xml")
    for path, text in (
        (target, json.dumps(labelstudio_tasks(audit_dir, frame_url_prefix), indent=2)),
        (config, labelstudio_config()),
    ):
        atomic_write(path, text)
        path.chmod(0o644)  # a Label Studio server, another user, reads these
    return [target, config]


@dataclass
class ImportReport:
    created: int = 0
    changed: int = 0
    unchanged: int = 0
    annotators: list[str] = field(default_factory=list)


def _read(path: Path) -> list[tuple[str, str, str, str, str]]:
    """(item_id, annotator, label, note, where) of each annotation in a Label Studio export."""
    if not path.is_file():
        raise InputError(f"label file not found: {path}")
    try:
        tasks = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise InputError(f"{path} is not JSON: {exc}") from None
    if not isinstance(tasks, list):
        raise InputError(f"{path} is not a Label Studio JSON export (a list of tasks)")
    out = []
    for t, task in enumerate(tasks):
        data = task.get("data") if isinstance(task, dict) else None
        if not isinstance(data, dict) or "item_id" not in data:
            raise InputError(f"{path} task {t}: no data.item_id (was it exported by vkr audit?)")
        for a, annotation in enumerate(task.get("annotations") or []):
            if annotation.get("was_cancelled"):
                continue
            where = f"{path} task {task.get('id', t)} (example {data['item_id']}) annotation {a}"
            annotator = check_annotator(_completed_by(annotation.get("completed_by")))
            label, note = None, ""
            for result in annotation.get("result") or []:
                value = result.get("value") or {}
                if result.get("from_name") == "label":
                    choices = value.get("choices") or [None]
                    label = _READ.get(str(choices[0]).strip())
                    if label is None:
                        shown = ", ".join(LABEL_NAMES.values())
                        raise InputError(f"{where}: label {choices[0]!r} is not one of {shown}")
                elif result.get("from_name") == "note":
                    texts = value.get("text") or []
                    note = "\n".join(texts) if isinstance(texts, list) else str(texts)
            if label is None:
                raise InputError(f"{where} by {annotator} has no 'label' choice")
            out.append((str(data["item_id"]), annotator, label, note, where))
    return out


def import_labelstudio(
    audit_dir: str | Path, path: str | Path, overwrite: bool = False
) -> ImportReport:
    source = Path(path)
    _, items = load_audit(audit_dir)
    known = {item.item_id for item in items}
    found = _read(source)
    unknown = sorted({item_id for item_id, *_ in found} - known)
    if unknown:
        raise InputError(
            f"{source} has labels for {len(unknown)} example(s) this audit did not sample: "
            + ", ".join(unknown[:5])
            + (" ..." if len(unknown) > 5 else "")
        )
    seen: dict[tuple[str, str], tuple[str, str, str]] = {}
    for item_id, annotator, label, note, where in found:
        earlier = seen.get((item_id, annotator))
        if earlier and earlier[:2] != (label, note):
            raise InputError(
                f"{source} has two different labels by {annotator} for example {item_id} "
                f"({earlier[2]}; {where}): keep one"
            )
        seen[(item_id, annotator)] = (label, note, where)
    report = ImportReport(annotators=sorted({a for _, a in seen}))
    with AuditLabels(AuditLayout(audit_dir).labels) as store:
        current = {(r["item_id"], r["annotator"]): (r["label"], r["note"]) for r in store.current()}
        conflicts = [
            f"example {item_id} by {annotator}: stored {current[key][0]}, file {label}"
            for key, (label, note, _) in seen.items()
            for item_id, annotator in [key]
            if key in current and current[key] != (label, note)
        ]
        if conflicts and not overwrite:
            raise InputError(
                f"{len(conflicts)} label(s) in {source} differ from labels already stored "
                f"({'; '.join(conflicts[:5])}{' ...' if len(conflicts) > 5 else ''}): nothing "
                "was imported. Use --overwrite to replace them (the old labels stay in the history)"
            )
        for (item_id, annotator), (label, note, _) in seen.items():
            status, _row = store.set(item_id, annotator, label, note, source="labelstudio")
            setattr(report, status, getattr(report, status) + 1)
    return report
