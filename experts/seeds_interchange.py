"""Seed review in Label Studio or Argilla: pending seeds out, approvals and revisions back.

Label Studio: a JSON list of tasks ``{"id", "data": {...}}`` with its labelling config (XML)
written beside it; its JSON export returns the same tasks with ``annotations[].result``.
Argilla 2.x: the layout of ``rg.Dataset.to_disk`` (``records.json`` plus
``.argilla/settings.json`` and ``.argilla/dataset.json``), as ``vkr qualify export`` writes;
responses come back in each record's ``responses``. Both are written and read with the
labelling pages' shared primitives (``labelling.interchange``). A review approves a seed or
revises it (the revised fields in text boxes, the others kept). Nothing is imported unless
every annotation is valid, and a seed saved again since the export is a conflict: the review
was of text that changed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from experts.seeds import check_seed, open_store, sampling_text, seed_frames_dir
from labelling.interchange import (
    Imported,
    argilla_record,
    frame_urls,
    frames_markdown,
    label_question,
    read_argilla,
    read_labelstudio,
    settings,
    terms_metadata,
    text_field,
    text_question,
    write_argilla,
    write_json,
    write_text,
)
from labelling.store import check_annotator
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
FORMATS = ("labelstudio", "argilla")
GUIDELINES = (
    "Review a seed example another expert wrote on the video's frames. approve: the question "
    "needs the frames, the answer is right and every reasoning step rests on a cited frame. "
    "revise: fill in only the fields you change (options one per line, 'A. ...'); your "
    "version replaces the seed's, whose original stays in its history."
)
METADATA = ("seed_id", "skill", "discipline", "video_id", "author", "sampling")


def _frames(seeds_dir: Path, video_id: str, sampling: FrameSampling, prefix: str) -> list[str]:
    # The frames the page sampled (their names carry index and time): the reviewer checks
    # the reasoning's timestamps against the same pictures the author saw.
    folder = seed_frames_dir(seeds_dir, video_id, sampling)
    return frame_urls(
        [p.relative_to(seeds_dir) for p in sorted(folder.glob("frame_*.jpg"))], prefix
    )


def pending_tasks(seeds_dir: str | Path, frame_url_prefix: str = "") -> list[dict[str, Any]]:
    """The pending seeds as Label Studio tasks (``data`` only), oldest first."""
    with open_store(seeds_dir, create=False) as store:
        pending = [s for s in store.documents() if s.status == "pending"]
    tasks: list[dict[str, Any]] = []
    for n, doc in enumerate(pending, start=1):
        seed, sampling = doc.body, FrameSampling(**doc.body["sampling"])
        data = {
            "seed_id": doc.doc_id,
            # The version reviewed: a seed saved again since is a conflict on import.
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
    return tasks


def argilla_settings() -> dict[str, Any]:
    """The Argilla dataset settings of a seed review."""
    return settings(
        fields=[
            text_field("frames", "Frames", markdown=True),
            text_field("question", "Question"),
            text_field("options", "Options"),
            text_field("answer", "Answer"),
            text_field("reasoning", "Reasoning"),
        ],
        questions=[
            label_question("verdict", "Approve or revise?", ("approve", "revise")),
            *(text_question(f"revised_{name}", f"Revised {name}") for name in REVISABLE),
        ],
        metadata=[terms_metadata(name) for name in METADATA],
        guidelines=GUIDELINES,
    )


def argilla_records(tasks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The Argilla records of ``pending_tasks``: one per seed, no responses yet."""
    records = []
    for task in tasks:
        seed = task["data"]
        fields = {
            "frames": frames_markdown(seed["frames"]) or "(no frames sampled yet)",
            "question": seed["question"],
            # A required field may not be empty.
            "options": seed["options"] or "(open question)",
            "answer": seed["answer"],
            "reasoning": seed["reasoning"],
        }
        metadata = {k: seed[k] for k in (*METADATA, "version")}
        records.append(argilla_record(fields, metadata, record_id=seed["seed_id"]))
    return records


def export_tasks(
    seeds_dir: str | Path, out: str | Path, frame_url_prefix: str = "", fmt: str = "labelstudio"
) -> int:
    """Write the pending seeds for a labelling tool (Label Studio tasks and their config
    beside them, or an Argilla dataset folder); returns how many.

    :param frame_url_prefix: put before each frame's SEEDS_DIR-relative path, e.g. Label
        Studio's ``/data/local-files/?d=seeds/``.
    """
    if fmt not in FORMATS:
        raise InputError(f"unknown format {fmt!r}: use one of {', '.join(FORMATS)}")
    tasks = pending_tasks(seeds_dir, frame_url_prefix)
    path = Path(out)
    if fmt == "argilla":
        write_argilla(path, "vkr-seeds", argilla_settings(), argilla_records(tasks))
    else:
        write_json(path, tasks)
        write_text(path.with_suffix(".config.xml"), CONFIG)
    return len(tasks)


# (seed_id, annotator, version reviewed, verdict, revised fields, where)
Review = tuple[str, str, int, str, dict[str, str], str]


def _review(item: Imported) -> Review:
    try:
        annotator = check_annotator(item.annotator)
    except InputError as exc:
        raise InputError(f"{item.where}: {exc}") from None
    revised = {
        name: text
        for name in REVISABLE
        if (text := str(item.values.get(f"revised_{name}") or "").strip())
    }
    verdict = item.values.get("verdict")
    if verdict not in ("approve", "revise"):
        raise InputError(f"{item.where}: verdict {verdict!r} is not approve or revise")
    if verdict == "revise" and not revised:
        raise InputError(f"{item.where}: a revision changes at least one field")
    version = int(item.task_data.get("version") or 0)
    return (item.item_id, annotator, version, str(verdict), revised, item.where)


def import_reviews(
    seeds_dir: str | Path, path: str | Path, skills: list[str], fmt: str = "labelstudio"
) -> dict[str, int]:
    """Apply the approvals and revisions of a Label Studio export or an Argilla dataset
    folder; all or nothing."""
    if fmt not in FORMATS:
        raise InputError(f"unknown format {fmt!r}: use one of {', '.join(FORMATS)}")
    read = read_argilla if fmt == "argilla" else read_labelstudio
    reviews = [_review(item) for item in read(Path(path), "seed_id")]
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
