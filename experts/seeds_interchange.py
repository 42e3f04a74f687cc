"""Seed review in Label Studio or Argilla: pending seeds out, approvals and revisions back.

Label Studio: a JSON list of tasks ``{"id", "data": {...}}`` with its labelling config (XML)
written beside it; its JSON export returns the same tasks with ``annotations[].result``.
Argilla 2.x: the layout of ``rg.Dataset.to_disk`` (``records.json`` plus
``.argilla/settings.json`` and ``.argilla/dataset.json``), as ``vkr qualify export`` writes;
responses come back in each record's ``responses``. A review approves a seed or revises it
(the revised fields in text boxes, the others kept). Nothing is imported unless every annotation is valid, and a
seed saved again since the export is a conflict: the review was of text that changed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from experts.seeds import check_seed, open_store, sampling_text, seed_frames_dir
from labelling.store import check_annotator
from vkr_core.files import atomic_write
from vkr_core.schemas import FrameSampling, InputError

REVISABLE = ("question", "options", "answer", "reasoning")
CONFIG = """<View>
  <Header value="$skill · $discipline · video $video_id · frames at $sampling"/>
  <Image name="frames" valueList="$frames"/>
  <Header value="Question"/>
  <Text name="question" value="$question"/>
  <Header value="Options (empty: open question)"/>
  <Text name="options" value="$options"/>
  <Header value="Answer"/>
  <Text name="answer" value="$answer"/>
  <Header value="Reasoning"/>
  <Text name="reasoning" value="$reasoning"/>
  <Choices name="verdict" toName="question" choice="single-radio" required="true">
    <Choice value="approve"/>
    <Choice value="revise"/>
  </Choices>
  <Header value="Revise: fill only the fields you change (options one per line)"/>
  <TextArea name="revised_question" toName="question" rows="2" maxSubmissions="1"/>
  <TextArea name="revised_options" toName="options" rows="4" maxSubmissions="1"/>
  <TextArea name="revised_answer" toName="answer" rows="1" maxSubmissions="1"/>
  <TextArea name="revised_reasoning" toName="reasoning" rows="5" maxSubmissions="1"/>
</View>
"""


def _frames(seeds_dir: Path, video_id: str, sampling: FrameSampling, prefix: str) -> list[str]:
    # The frames the page sampled (their names carry index and time): the reviewer checks
    # the reasoning's timestamps against the same pictures the author saw.
    folder = seed_frames_dir(seeds_dir, video_id, sampling)
    where = folder.relative_to(seeds_dir).as_posix()  # the same path under the URL prefix
    return [f"{prefix}{where}/{p.name}" for p in sorted(folder.glob("frame_*.jpg"))]


FORMATS = ("labelstudio", "argilla")
GUIDELINES = (
    "Review a seed example another expert wrote on the video's frames. approve: the question "
    "needs the frames, the answer is right and every reasoning step rests on a cited frame. "
    "revise: fill in only the fields you change (options one per line, 'A. ...'); your "
    "version replaces the seed's, whose original stays in its history."
)


def export_tasks(
    seeds_dir: str | Path, out: str | Path, frame_url_prefix: str = "", fmt: str = "labelstudio"
) -> int:
    """Write the pending seeds for a labelling tool (Label Studio tasks and their config
    beside them, or an Argilla dataset folder); returns how many.

    :param frame_url_prefix: put before each frame's SEEDS_DIR-relative path, e.g. Label
        Studio's ``/data/local-files/?d=seeds/``.
    """
    with open_store(seeds_dir, create=False) as store:
        pending = [s for s in store.documents() if s.status == "pending"]
    tasks: list[dict[str, Any]] = []
    for n, doc in enumerate(pending, start=1):
        seed, sampling = doc.body, FrameSampling(**doc.body["sampling"])
        data = {
            "seed_id": doc.doc_id,
            "version": len(doc.history),
            "author": doc.author,
            **{k: seed[k] for k in ("video_id", "discipline", "skill", "question")},
            "options": "\n".join(seed["options"] or []),
            "answer": seed["answer"],
            "reasoning": seed["reasoning"],
            "sampling": sampling_text(sampling),
            "frames": _frames(Path(seeds_dir), seed["video_id"], sampling, frame_url_prefix),
        }
        tasks.append({"id": n, "data": data})
    path = Path(out)
    if fmt == "argilla":
        _write_argilla(path, [task["data"] for task in tasks])
    elif fmt == "labelstudio":
        atomic_write(path, json.dumps(tasks, indent=1, ensure_ascii=False))
        atomic_write(path.with_suffix(".config.xml"), CONFIG)
    else:
        raise InputError(f"unknown format {fmt!r}: use one of {', '.join(FORMATS)}")
    return len(tasks)


def _argilla_settings() -> dict[str, Any]:
    def text(name: str, title: str, markdown: bool = False) -> dict[str, Any]:
        return {
            "name": name,
            "title": title,
            "required": True,
            "settings": {"type": "text", "use_markdown": markdown},
        }

    def answer(name: str, title: str) -> dict[str, Any]:
        return {
            "name": name,
            "title": title,
            "description": None,
            "required": False,
            "settings": {"type": "text", "use_markdown": False},
        }

    def terms(name: str) -> dict[str, Any]:
        return {
            "name": name,
            "title": name,
            "settings": {"type": "terms", "values": None},
            "visible_for_annotators": True,
        }

    verdict = {
        "name": "verdict",
        "title": "Approve or revise?",
        "description": None,
        "required": True,
        "settings": {
            "type": "label_selection",
            "options": [
                {"value": v, "text": v, "description": None} for v in ("approve", "revise")
            ],
            "visible_options": None,
        },
    }
    return {
        "guidelines": GUIDELINES,
        "fields": [
            text("frames", "Frames", markdown=True),
            text("question", "Question"),
            text("options", "Options"),
            text("answer", "Answer"),
            text("reasoning", "Reasoning"),
        ],
        "questions": [verdict]
        + [answer(f"revised_{name}", f"Revised {name}") for name in REVISABLE],
        "vectors": [],
        "metadata": [
            terms(n) for n in ("seed_id", "skill", "discipline", "video_id", "author", "sampling")
        ],
        "allow_extra_metadata": True,
    }


def _write_argilla(target: Path, seeds: list[dict[str, Any]]) -> None:
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise InputError(
            f"{target} exists and is not an empty folder: Argilla exports are folders "
            "(records.json and .argilla/), like rg.Dataset.to_disk writes"
        )
    records = []
    for seed in seeds:
        frames = "\n".join(f"![{Path(ref).name}]({ref})" for ref in seed["frames"])
        records.append(
            {
                "id": seed["seed_id"],
                "fields": {
                    "frames": frames or "(no frames sampled yet)",
                    "question": seed["question"],
                    # A required field may not be empty.
                    "options": seed["options"] or "(open question)",
                    "answer": seed["answer"],
                    "reasoning": seed["reasoning"],
                },
                "metadata": {
                    k: seed[k]
                    for k in (
                        "seed_id",
                        "version",
                        "skill",
                        "discipline",
                        "video_id",
                        "author",
                        "sampling",
                    )
                },
                "suggestions": {},
                "responses": {},
                "vectors": {},
                "_server_id": None,
            }
        )
    atomic_write(target / "records.json", json.dumps(records, indent=1, ensure_ascii=False))
    atomic_write(target / ".argilla" / "settings.json", json.dumps(_argilla_settings(), indent=1))
    dataset = {
        "name": "vkr-seeds",
        "guidelines": GUIDELINES,
        "allow_extra_metadata": True,
        "status": "ready",
    }
    atomic_write(target / ".argilla" / "dataset.json", json.dumps(dataset, indent=1))


def _annotator(value: Any, where: str) -> str:
    # Label Studio writes a user id, or a user object in fuller exports.
    if isinstance(value, dict):
        value = value.get("email") or value.get("username") or value.get("id")
    if isinstance(value, int) and not isinstance(value, bool):
        value = f"labelstudio-user-{value}"
    if not isinstance(value, str):
        raise InputError(f"{where} has no usable completed_by ({value!r})")
    return check_annotator(value)


Review = tuple[str, str, int, str, dict[str, str], str]


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise InputError(f"review export not found: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{path} is not JSON: {exc}") from None


def _checked(verdict: Any, revised: dict[str, str], where: str) -> str:
    if verdict not in ("approve", "revise"):
        raise InputError(f"{where}: verdict {verdict!r} is not approve or revise")
    if verdict == "revise" and not revised:
        raise InputError(f"{where}: a revision changes at least one field")
    return str(verdict)


def _argilla_reviews(path: Path) -> list[Review]:
    """Reviews from Argilla records (a to_disk folder or its records.json)."""
    records_path = path / "records.json" if path.is_dir() else path
    records = _read_json(records_path)
    if not isinstance(records, list):
        raise InputError(f"{records_path} is not a list of Argilla records")
    reviews = []
    for r, record in enumerate(records):
        metadata = record.get("metadata") if isinstance(record, dict) else None
        if not isinstance(metadata, dict) or not isinstance(metadata.get("seed_id"), str):
            raise InputError(f"{records_path} record {r}: no metadata.seed_id (from vkr seeds?)")
        by_user: dict[str, dict[str, Any]] = {}
        for question, answers in (record.get("responses") or {}).items():
            for answer in answers or []:
                user = str(answer.get("user_id") or "").strip()
                if not user:
                    raise InputError(
                        f"{records_path} record {r}: a {question!r} response has no user_id"
                    )
                by_user.setdefault(user, {})[question] = answer.get("value")
        for user, answers in sorted(by_user.items()):
            where = f"{records_path} record {r} by {user}"
            revised = {
                name: str(answers.get(f"revised_{name}") or "").strip()
                for name in REVISABLE
                if str(answers.get(f"revised_{name}") or "").strip()
            }
            verdict = _checked(answers.get("verdict"), revised, where)
            reviews.append(
                (
                    metadata["seed_id"],
                    check_annotator(user),
                    int(metadata.get("version") or 0),
                    verdict,
                    revised,
                    where,
                )
            )
    return reviews


def _reviews(path: Path) -> list[Review]:
    """(seed_id, annotator, version, verdict, revised fields, where) per annotation."""
    tasks = _read_json(path)
    if not isinstance(tasks, list):
        raise InputError(f"{path} is not a Label Studio JSON export (a list of tasks)")
    reviews = []
    for t, task in enumerate(tasks):
        data = task.get("data") if isinstance(task, dict) else None
        if not isinstance(data, dict) or not isinstance(data.get("seed_id"), str):
            raise InputError(f"{path} task {t}: no data.seed_id (was it exported by vkr seeds?)")
        for a, annotation in enumerate(task.get("annotations") or []):
            if not isinstance(annotation, dict) or annotation.get("was_cancelled"):
                continue
            where = f"{path} task {task.get('id', t)} annotation {a}"
            annotator = _annotator(annotation.get("completed_by"), where)
            verdict = None
            revised: dict[str, str] = {}
            for result in annotation.get("result") or []:
                value = result.get("value") or {}
                name = result.get("from_name")
                if name == "verdict":
                    verdict = (value.get("choices") or [None])[0]
                elif isinstance(name, str) and name.startswith("revised_"):
                    text = "\n".join(value.get("text") or []).strip()
                    if text:
                        revised[name.removeprefix("revised_")] = text
            checked = _checked(verdict, revised, f"{where} by {annotator}")
            version = int(data.get("version") or 0)
            reviews.append((data["seed_id"], annotator, version, checked, revised, where))
    return reviews


def import_reviews(
    seeds_dir: str | Path, path: str | Path, skills: list[str], fmt: str = "labelstudio"
) -> dict[str, int]:
    """Apply the approvals and revisions of a Label Studio export or an Argilla dataset
    folder; all or nothing."""
    if fmt not in FORMATS:
        raise InputError(f"unknown format {fmt!r}: use one of {', '.join(FORMATS)}")
    reviews = _argilla_reviews(Path(path)) if fmt == "argilla" else _reviews(Path(path))
    with open_store(seeds_dir, create=False) as store:
        current = {s.doc_id: s for s in store.documents()}
        planned: list[tuple[str, str, dict[str, Any] | None]] = []
        for seed_id, annotator, version, verdict, revised, where in reviews:
            seed = current.get(seed_id)
            if seed is None:
                raise InputError(f"{where}: {seeds_dir} has no seed {seed_id!r}")
            if any(planned_id == seed_id for planned_id, _, _ in planned):
                raise InputError(f"{where}: a second review of seed {seed_id[:8]} in one file")
            if len(seed.history) != version:
                raise InputError(
                    f"{where}: seed {seed_id[:8]} was saved again since the export (version "
                    f"{version}, now {len(seed.history)}): export the tasks again"
                )
            if verdict == "approve":
                if annotator == seed.author:
                    raise InputError(
                        f"{where}: {annotator} wrote this seed: a second annotator approves it"
                    )
                planned.append((seed_id, annotator, None))
                continue
            body = {k: seed.body[k] for k in ("skill", "subject", *REVISABLE)}
            body.update(revised)
            if "options" in revised:
                body["options"] = [o for o in revised["options"].splitlines() if o.strip()]
            try:
                checked = check_seed(body, skills)
            except InputError as exc:
                raise InputError(f"{where}: {exc}") from None
            # The reviewer saw the frames the seed was written on.
            checked.update({k: seed.body[k] for k in ("video_id", "discipline", "sampling")})
            planned.append((seed_id, annotator, checked))
        for seed_id, annotator, content in planned:
            if content is None:
                store.approve(seed_id, annotator, source=fmt)
            else:
                store.save(seed_id, annotator, content, source=fmt)
    approved = sum(1 for _, _, c in planned if c is None)
    return {"approved": approved, "revised": len(planned) - approved}
