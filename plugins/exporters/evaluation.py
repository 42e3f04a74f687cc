"""VideoKR-Eval style jsonl: one question per line, hyphenated problem types.

The file is named and shaped as the official lmms-eval task ``videokr_eval`` reads it
(``videokr_eval.yaml``: ``data_files: VideoKR_eval.jsonl``; ``doc_to_text`` reads
``question``, ``options``, ``problem_type``; ``doc_to_target`` reads ``solution``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from corpus.exporters import (
    MULTIPLE_CHOICE,
    Exporter,
    ExportOption,
    SplitData,
    checked_answer,
    write_jsonl,
)

EVAL_FILE = "VideoKR_eval.jsonl"
# The eval files spell the type with a hyphen, unlike the training files.
EVAL_PROBLEM_TYPES = {MULTIPLE_CHOICE: "multiple-choice", "open-ended": "open-ended"}


class EvalExporter(Exporter):
    name = "eval"
    description = "VideoKR-Eval jsonl for the lmms-eval videokr_eval task (VideoKR_eval.jsonl)"
    options = {
        "part": ExportOption("all", "which examples: all, sft or rl"),
        "dataset": ExportOption("videokr", "the `dataset` (source benchmark) field"),
    }

    def write(self, data: SplitData, out_dir: Path, options: dict[str, Any]) -> list[Path]:
        rows = []
        for example in data.part(options["part"]):
            answer = checked_answer(example)
            row: dict[str, Any] = {
                "id": example.problem_id,
                "video_path": example.video_path,
                "question": example.question,
            }
            if example.problem_type == MULTIPLE_CHOICE:
                row["options"] = list(example.options or [])
            row.update(
                problem_type=EVAL_PROBLEM_TYPES[example.problem_type],
                solution=f"<answer>{answer}</answer>",
                dataset=options["dataset"],
                subject=example.subject,
                skill=example.skill,
                discipline=example.discipline,
            )
            rows.append(row)
        return [write_jsonl(out_dir / EVAL_FILE, rows)]
