"""Run directories of accepted examples for the split, export and reward tests.

Records are built with the real schemas and written the way a run writes them
(``records/<video_id>.json``); the videos are links to the real test videos.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from videos import CORRUPTED, PANCAKE, ROTATED, UNORDERED, video_dir

from corpus.report import PAPER_SKILLS as SKILLS
from vkr_core.schemas import AcceptedExample, Verdict, Video, VideoRecord

LINKED = sorted([CORRUPTED, PANCAKE, ROTATED, UNORDERED])

SUBJECTS = [
    ("physics", "mechanics", "Newton's second law"),
    ("chemistry", "acid-base reactions", "neutralisation"),
    ("culinary arts", "pan cooking", "Maillard reaction"),
    ("biology", "cell biology", "osmosis"),
]
OPEN_ANSWERS = [
    "the pancake is flipped once",
    "heat browns the batter",
    "the force accelerates the cart",
    "water moves into the cell",
]


def make_example(
    video_id: str, index: int, video_path: str, *, multiple_choice: bool
) -> AcceptedExample:
    """One accepted example; skills and subjects rotate so every corpus has all of them."""
    skill = SKILLS[index % len(SKILLS)]
    discipline, subject, point = SUBJECTS[index % len(SUBJECTS)]
    problem_id = f"{video_id}-{skill}-{index}"
    verdicts = [
        Verdict(
            step="self_consistency", passed=True, reason="re-solved: same answer", models=["m1"]
        ),
        Verdict(
            step="video_dependency", passed=True, reason="blind models failed", models=["b1", "b2"]
        ),
        Verdict(step="cot_verification", passed=True, reason="every step supported", models=["v1"]),
    ]
    models = {"example_generation": ["gen-a"], "cot_verification": ["v1"]}
    if multiple_choice:
        letter = "ABCD"[index % 4]
        return AcceptedExample(
            problem_id=problem_id,
            question=f"At 00:{index:02d}, what does the person do next in the {subject} demo?",
            options=[
                "A. Flips the pan",
                "B. Adds more batter",
                "C. Turns off the heat",
                "D. Walks away",
            ],
            problem_type="multiple choice",
            solution=f"<answer>{letter}</answer>",
            think=f"<think>At 00:{index:02d} the hand grips the handle, so option {letter}.</think>",
            video_path=video_path,
            skill=skill,
            subject=subject,
            discipline=discipline,
            knowledge_point=point if skill != "VidR" else None,
            video_id=video_id,
            models=models,
            verdicts=verdicts,
        )
    answer = OPEN_ANSWERS[index % len(OPEN_ANSWERS)]
    return AcceptedExample(
        problem_id=problem_id,
        question=f"Which {point} step is shown between 00:02 and 00:{index + 5:02d}?",
        problem_type="open-ended",
        solution=f"<answer>{answer}</answer>",
        think=f"<think>The frames from 00:02 show the {subject} step; hence: {answer}.</think>",
        video_path=video_path,
        skill=skill,
        subject=subject,
        discipline=discipline,
        knowledge_point=point,
        video_id=video_id,
        models=models,
        verdicts=verdicts,
    )


def link_video(video_root: Path, video_id: str, index: int) -> Path:
    """A file under ``video_root`` for this video: a link to one of the real test videos."""
    real = video_dir() / LINKED[index % len(LINKED)]
    path = video_root / "clips" / f"{video_id}{real.suffix}"
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        os.symlink(real, path)
    return path


def write_record(run_dir: Path, record: VideoRecord) -> Path:
    records = run_dir / "records"
    records.mkdir(parents=True, exist_ok=True)
    path = records / f"{record.video_id}.json"
    path.write_text(record.model_dump_json(indent=2))
    return path


def make_run(
    run_dir: Path, video_root: Path, n_videos: int = 30, prefix: str = "vid"
) -> list[AcceptedExample]:
    """A run directory with ``n_videos`` records of 1 to 6 accepted examples (MC and open-ended)."""
    examples: list[AcceptedExample] = []
    for v in range(n_videos):
        video_id = f"{prefix}{v:03d}"
        path = link_video(video_root, video_id, v)
        count = 1 + (v * 7) % 6
        accepted = [
            make_example(video_id, v + i, str(path), multiple_choice=(v + i) % 3 != 0)
            for i in range(count)
        ]
        examples += accepted
        record = VideoRecord(
            video_id=video_id,
            video=Video(video_id=video_id, path=str(path), discipline=accepted[0].discipline),
            status="done",
            frames=12,
            generated=6,
            accepted=accepted,
        )
        write_record(run_dir, record)
    failed = VideoRecord(
        video_id=f"{prefix}-broken",
        video=Video(video_id=f"{prefix}-broken", path=str(video_dir() / CORRUPTED)),
        status="failed",
        failure="decoding stopped after 28 frames",
    )
    write_record(run_dir, failed)
    return examples


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
