"""Seed review through Label Studio: pending seeds out as tasks, approvals and revisions back.

The tasks file is a JSON list ``{"id", "data": {...}}`` with its labelling config (XML)
written beside it; Label Studio's JSON export returns the same tasks with
``annotations[].result``. An annotation approves a seed or revises it (the revised fields in
text areas, the others kept). Nothing is imported unless every annotation is valid, and a
seed saved again since the export is a conflict: the review was of text that changed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from experts.seeds import SeedStore, check_seed
from qualification.labels import check_annotator
from vkr_core.files import atomic_write
from vkr_core.schemas import InputError

REVISABLE = ("question", "options", "answer", "reasoning")
CONFIG = """<View>
  <Header value="$skill · $discipline · video $video_id"/>
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


def _frames(seeds_dir: Path, video_id: str, prefix: str) -> list[str]:
    # The frames the page sampled (their names carry index and time): the reviewer checks
    # the reasoning's timestamps against the same pictures the author saw.
    folder = seeds_dir / "frames" / video_id
    return [prefix + f"frames/{video_id}/{p.name}" for p in sorted(folder.glob("frame_*.jpg"))]


def export_tasks(seeds_dir: str | Path, out: str | Path, frame_url_prefix: str = "") -> int:
    """Write the pending seeds as Label Studio tasks (and the config beside them).

    :param frame_url_prefix: put before each frame's SEEDS_DIR-relative path, e.g. Label
        Studio's ``/data/local-files/?d=seeds/``.
    """
    store = _open(seeds_dir)
    try:
        pending = [s for s in store.seeds() if s["status"] == "pending"]
    finally:
        store.close()
    tasks = [
        {
            "id": n,
            "data": {
                "seed_id": seed["seed_id"],
                "version": len(seed["history"]),
                "author": seed["author"],
                "video_id": seed["video_id"],
                "discipline": seed["discipline"],
                "skill": seed["skill"],
                "question": seed["question"],
                "options": "\n".join(seed["options"] or []),
                "answer": seed["answer"],
                "reasoning": seed["reasoning"],
                "frames": _frames(Path(seeds_dir), seed["video_id"], frame_url_prefix),
            },
        }
        for n, seed in enumerate(pending, start=1)
    ]
    path = Path(out)
    atomic_write(path, json.dumps(tasks, indent=1, ensure_ascii=False))
    atomic_write(path.with_suffix(".config.xml"), CONFIG)
    return len(tasks)


def _open(seeds_dir: str | Path) -> SeedStore:
    path = Path(seeds_dir) / "seeds.sqlite"
    if not path.is_file():
        raise InputError(
            f"no seeds in {seeds_dir}: {path} not found (write some with vkr seeds serve)"
        )
    return SeedStore(path)


def _annotator(value: Any, where: str) -> str:
    # Label Studio writes a user id, or a user object in fuller exports.
    if isinstance(value, dict):
        value = value.get("email") or value.get("username") or value.get("id")
    if isinstance(value, int) and not isinstance(value, bool):
        value = f"labelstudio-user-{value}"
    if not isinstance(value, str):
        raise InputError(f"{where} has no usable completed_by ({value!r})")
    return check_annotator(value)


def _reviews(path: Path) -> list[tuple[str, str, int, str, dict[str, str], str]]:
    """(seed_id, annotator, version, verdict, revised fields, where) per annotation."""
    if not path.is_file():
        raise InputError(f"Label Studio export not found: {path}")
    try:
        tasks = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{path} is not JSON: {exc}") from None
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
            if verdict not in ("approve", "revise"):
                raise InputError(
                    f"{where} by {annotator}: verdict {verdict!r} is not approve or revise"
                )
            if verdict == "revise" and not revised:
                raise InputError(f"{where} by {annotator}: a revision changes at least one field")
            version = data.get("version")
            reviews.append((data["seed_id"], annotator, int(version or 0), verdict, revised, where))
    return reviews


def import_reviews(seeds_dir: str | Path, path: str | Path, skills: list[str]) -> dict[str, int]:
    """Apply a Label Studio export's approvals and revisions; all or nothing."""
    reviews = _reviews(Path(path))
    store = _open(seeds_dir)
    try:
        current = {s["seed_id"]: s for s in store.seeds()}
        planned: list[tuple[str, str, dict[str, Any] | None]] = []
        for seed_id, annotator, version, verdict, revised, where in reviews:
            seed = current.get(seed_id)
            if seed is None:
                raise InputError(f"{where}: {seeds_dir} has no seed {seed_id!r}")
            if any(planned_id == seed_id for planned_id, _, _ in planned):
                raise InputError(f"{where}: a second review of seed {seed_id[:8]} in one file")
            if len(seed["history"]) != version:
                raise InputError(
                    f"{where}: seed {seed_id[:8]} was saved again since the export (version "
                    f"{version}, now {len(seed['history'])}): export the tasks again"
                )
            if verdict == "approve":
                if annotator == seed["author"]:
                    raise InputError(
                        f"{where}: {annotator} wrote this seed: a second annotator approves it"
                    )
                planned.append((seed_id, annotator, None))
                continue
            body = {k: seed[k] for k in ("skill", "subject", *REVISABLE)}
            body.update(revised)
            if "options" in revised:
                body["options"] = [o for o in revised["options"].splitlines() if o.strip()]
            try:
                checked = check_seed(body, skills)
            except InputError as exc:
                raise InputError(f"{where}: {exc}") from None
            checked.update(video_id=seed["video_id"], discipline=seed["discipline"])
            planned.append((seed_id, annotator, checked))
        for seed_id, annotator, content in planned:
            if content is None:
                store.save(seed_id, annotator, {}, approve=True)
            else:
                store.save(seed_id, annotator, content)
    finally:
        store.close()
    approved = sum(1 for _, _, c in planned if c is None)
    return {"approved": approved, "revised": len(planned) - approved}
