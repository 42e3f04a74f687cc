"""verl RL data: a parquet file of chat prompts with a video, scored by corpus/reward.py.

Rows match the official ``verl/local_script/prepare_videokr_rl_data.py`` output for the same
VideoKR RL rows, column for column and type for type, so a vkr parquet and an official one go
into one ``data.train_files``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from corpus.exporters import (
    Exporter,
    ExportOption,
    SplitData,
    checked_answer,
    user_prompt,
)
from corpus.reward import DATA_SOURCE
from vkr_core.files import atomic_path
from vkr_core.schemas import InputError

ABILITY = "video_qa"
# The official prep's default for both bounds: 128 patches of 28x28 pixels per frame.
_PIXELS = 128 * 28 * 28


def _schema() -> Any:
    import pyarrow as pa

    return pa.schema(
        [
            ("data_source", pa.string()),
            ("prompt", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))),
            (
                "videos",
                pa.list_(
                    pa.struct(
                        [
                            ("video", pa.string()),
                            ("fps", pa.float64()),
                            ("max_frames", pa.int64()),
                            ("min_frames", pa.int64()),
                            ("max_pixels", pa.int64()),
                            ("min_pixels", pa.int64()),
                        ]
                    )
                ),
            ),
            ("ability", pa.string()),
            ("reward_model", pa.struct([("style", pa.string()), ("ground_truth", pa.string())])),
            (
                "extra_info",
                pa.struct(
                    [
                        ("problem_id", pa.string()),
                        ("problem_type", pa.string()),
                        ("answer", pa.string()),
                        ("solution", pa.string()),
                        ("source_path", pa.string()),
                        ("split", pa.string()),
                        ("index", pa.int64()),
                    ]
                ),
            ),
        ]
    )


class VerlExporter(Exporter):
    name = "verl"
    description = "verl parquet for GRPO (prompt, videos, reward_model), RL set by default"
    options = {
        "part": ExportOption("rl", "which examples: rl, sft or all"),
        "split": ExportOption("train", "split name: file <split>.parquet and extra_info.split"),
        "fps": ExportOption(2.0, "frames per second the trainer samples"),
        "max_frames": ExportOption(128, "most frames per video"),
        "min_frames": ExportOption(4, "fewest frames per video"),
        # Without a pixel cap a 720p clip is ~46k video tokens: the official GRPO script then
        # drops it as overlong.
        "max_pixels": ExportOption(_PIXELS, "most pixels per frame (official: 128*28*28)"),
        "min_pixels": ExportOption(_PIXELS, "fewest pixels per frame (official: 128*28*28)"),
        "video_prefix": ExportOption(
            "", "prepended to each relative video path (verl opens paths as given)"
        ),
    }

    def write(self, data: SplitData, out_dir: Path, options: dict[str, Any]) -> list[Path]:
        import pyarrow as pa
        import pyarrow.parquet as pq

        split = str(options["split"])
        if not split or "/" in split or os.sep in split:
            raise InputError(f"verl split name {split!r} must be a plain file stem")
        if options["min_frames"] < 1 or options["max_frames"] < options["min_frames"]:
            raise InputError(
                f"verl frames: need 1 <= min_frames <= max_frames, got "
                f"min_frames={options['min_frames']} max_frames={options['max_frames']}"
            )
        if options["fps"] <= 0:
            raise InputError(f"verl fps must be positive, got {options['fps']}")
        if options["min_pixels"] < 1 or options["max_pixels"] < options["min_pixels"]:
            raise InputError(
                f"verl pixels: need 1 <= min_pixels <= max_pixels, got "
                f"min_pixels={options['min_pixels']} max_pixels={options['max_pixels']}"
            )
        rows = []
        for index, example in enumerate(data.part(options["part"])):
            answer = checked_answer(example)
            rows.append(
                {
                    "data_source": DATA_SOURCE,
                    "prompt": [{"role": "user", "content": user_prompt(example, "rl")}],
                    "videos": [
                        {
                            "video": options["video_prefix"] + example.video_path,
                            "fps": float(options["fps"]),
                            "max_frames": int(options["max_frames"]),
                            "min_frames": int(options["min_frames"]),
                            "max_pixels": int(options["max_pixels"]),
                            "min_pixels": int(options["min_pixels"]),
                        }
                    ],
                    "ability": ABILITY,
                    "reward_model": {
                        "style": "rule",
                        "ground_truth": f"<answer>{answer}</answer>",
                    },
                    "extra_info": {
                        "problem_id": example.problem_id,
                        "problem_type": example.problem_type,
                        "answer": answer,
                        "solution": f"<answer>{answer}</answer>",
                        # The path as the VideoKR row gives it, before video_prefix.
                        "source_path": example.video_path,
                        "split": split,
                        "index": index,
                    },
                }
            )
        path = out_dir / f"{split}.parquet"
        with atomic_path(path) as temporary:
            pq.write_table(pa.Table.from_pylist(rows, schema=_schema()), temporary)
        return [path]
