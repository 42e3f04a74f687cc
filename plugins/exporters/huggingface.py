"""Hugging Face ``datasets`` layout, written without the ``datasets`` package.

Parquet shards under ``data/<config>/`` for the ``sft``, ``rl`` and ``videos`` (the manifest:
videos are referenced by path relative to the video root, never embedded) configs, and a
README.md dataset card whose YAML front matter declares them, so
``load_dataset(path_or_repo, config)`` works for each. Every config is parquet: ``datasets``
reads all configs of a folder with one builder, so a jsonl config beside parquet ones fails.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path
from typing import Any

from corpus.exporters import (
    MULTIPLE_CHOICE,
    Exporter,
    ExportOption,
    SplitData,
    checked_answer,
    checked_trace,
)
from vkr_core.files import atomic_path, atomic_write
from vkr_core.schemas import InputError

RL_COLUMNS = (
    "problem_id",
    "question",
    "options",
    "problem_type",
    "solution",
    "video_path",
    "skill",
    "subject",
    "discipline",
    "video_id",
)
SFT_COLUMNS = (*RL_COLUMNS[:5], "think", *RL_COLUMNS[5:], "knowledge_point", "models", "verdicts")
VIDEO_COLUMNS = ("video_id", "video_path", "split", "examples")


def _schema(columns: tuple[str, ...]) -> Any:
    import pyarrow as pa

    types = {"options": pa.list_(pa.string()), "examples": pa.int64()}
    return pa.schema([(c, types.get(c, pa.string())) for c in columns])


def _size_category(n: int) -> str:
    for limit, label in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K")):
        if n < limit:
            return label
    return "100K<n<1M" if n < 1_000_000 else "1M<n<10M"


class HuggingFaceExporter(Exporter):
    name = "hf"
    description = (
        "Hugging Face datasets layout: parquet shards (sft, rl, videos manifest), dataset card"
    )
    options = {
        "shard_size": ExportOption(20_000, "rows per parquet shard"),
        "pretty_name": ExportOption("vkr video QA with chain-of-thought", "dataset card title"),
        "license": ExportOption("", "licence id for the card (omitted when empty)"),
    }

    def write(self, data: SplitData, out_dir: Path, options: dict[str, Any]) -> list[Path]:
        shard_size = int(options["shard_size"])
        if shard_size < 1:
            raise InputError(f"hf shard_size must be at least 1, got {shard_size}")
        sft_rows = [
            {
                **self._rl_fields(e),
                "think": f"<think>{checked_trace(e)}</think>",
                "knowledge_point": e.knowledge_point,
                # Open-ended shapes (per-step model lists, verdict details) stay JSON text so
                # every shard has the same schema.
                "models": json.dumps(e.models, ensure_ascii=False, sort_keys=True),
                "verdicts": json.dumps(
                    [v.model_dump(mode="json") for v in e.verdicts], ensure_ascii=False
                ),
            }
            for e in data.sft
        ]
        rl_rows = [self._rl_fields(e) for e in data.rl]
        written = self._shards(out_dir, "sft", sft_rows, SFT_COLUMNS, shard_size)
        written += self._shards(out_dir, "rl", rl_rows, RL_COLUMNS, shard_size)

        videos: dict[str, dict[str, Any]] = {}
        for side, examples in (("sft", data.sft), ("rl", data.rl)):
            for e in examples:
                entry = videos.setdefault(
                    e.video_id,
                    {"video_id": e.video_id, "video_path": e.video_path, "split": side},
                )
                entry["examples"] = entry.get("examples", 0) + 1
        manifest = [videos[k] for k in sorted(videos)]
        written += self._shards(out_dir, "videos", manifest, VIDEO_COLUMNS, shard_size)
        card = out_dir / "README.md"
        atomic_write(card, self._card(data, options, len(videos)))
        return [*written, card]

    @staticmethod
    def _rl_fields(example: Any) -> dict[str, Any]:
        is_mc = example.problem_type == MULTIPLE_CHOICE
        return {
            "problem_id": example.problem_id,
            "question": example.question,
            "options": list(example.options or []) if is_mc else None,
            "problem_type": example.problem_type,
            "solution": f"<answer>{checked_answer(example)}</answer>",
            "video_path": example.video_path,
            "skill": example.skill,
            "subject": example.subject,
            "discipline": example.discipline,
            "video_id": example.video_id,
        }

    @staticmethod
    def _shards(
        out_dir: Path, config: str, rows: list[dict[str, Any]], columns: tuple[str, ...], size: int
    ) -> list[Path]:
        import pyarrow as pa
        import pyarrow.parquet as pq

        folder = out_dir / "data" / config
        folder.mkdir(parents=True, exist_ok=True)
        # Shards of an earlier export with another shard count would match the card's glob.
        for old in folder.glob("train-*.parquet"):
            old.unlink()
        count = max(1, math.ceil(len(rows) / size))
        paths = []
        for i in range(count):
            path = folder / f"train-{i:05d}-of-{count:05d}.parquet"
            table = pa.Table.from_pylist(rows[i * size : (i + 1) * size], schema=_schema(columns))
            with atomic_path(path) as temporary:
                pq.write_table(table, temporary)
            paths.append(path)
        return paths

    @staticmethod
    def _card(data: SplitData, options: dict[str, Any], video_count: int) -> str:
        import yaml

        total = len(data.sft) + len(data.rl)
        front: dict[str, Any] = {"pretty_name": options["pretty_name"]}
        if options["license"]:
            front["license"] = options["license"]
        front.update(
            task_categories=["video-text-to-text"],
            tags=["video", "chain-of-thought", "videokr", "vkr"],
            size_categories=[_size_category(total)],
            configs=[
                {
                    "config_name": "sft",
                    "default": True,
                    "data_files": [{"split": "train", "path": "data/sft/train-*.parquet"}],
                },
                {
                    "config_name": "rl",
                    "data_files": [{"split": "train", "path": "data/rl/train-*.parquet"}],
                },
                {
                    "config_name": "videos",
                    "data_files": [{"split": "train", "path": "data/videos/train-*.parquet"}],
                },
            ],
        )

        def counts(examples: list[Any]) -> str:
            skills = Counter(e.skill for e in examples)
            types = Counter(e.problem_type for e in examples)
            parts = [f"{k} {v}" for k, v in sorted(skills.items())]
            parts += [f"{k} {v}" for k, v in sorted(types.items())]
            return ", ".join(parts) or "-"

        lines = [
            "---",
            yaml.safe_dump(front, sort_keys=False, allow_unicode=True).rstrip(),
            "---",
            "",
            f"# {options['pretty_name']}",
            "",
            "Video question answering with chain-of-thought, built with vkr (the VideoKR "
            "pipeline) and split by video: no video has examples in both the SFT and the RL "
            "configuration.",
            "",
            "| config | examples | breakdown |",
            "|---|---|---|",
            f"| `sft` | {len(data.sft)} | {counts(data.sft)} |",
            f"| `rl` | {len(data.rl)} | {counts(data.rl)} |",
            f"| `videos` | {video_count} | one row per video: video_id, video_path, split, examples |",
            "",
            "## Videos",
            "",
            "Videos are not embedded. `video_path` is relative to the video root the data was "
            "exported with; fetch the videos separately and join the two.",
            "",
            "## Fields",
            "",
            '- `problem_id`, `question`, `options` (multiple choice only, `"A. ..."` in letter '
            "order), `problem_type` (`multiple choice` or `open-ended`), `solution` "
            "(`<answer>X</answer>`), `video_path`, `skill` (VidR, KnowVid, KnowVidR), `subject`, "
            "`discipline`, `video_id`.",
            "- `sft` only: `think` (`<think>...</think>`, the verified reasoning trace), "
            "`knowledge_point`, `models` and `verdicts` (JSON text: the model of each step and "
            "each verifier's decision).",
            "",
            "## Loading",
            "",
            "```python",
            "from datasets import load_dataset",
            "",
            'sft = load_dataset("PATH_OR_REPO", "sft", split="train")',
            'rl = load_dataset("PATH_OR_REPO", "rl", split="train")',
            'videos = load_dataset("PATH_OR_REPO", "videos", split="train")',
            "```",
            "",
        ]
        return "\n".join(lines)
