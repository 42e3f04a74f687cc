"""LLaMA-Factory SFT data: a sharegpt JSON list with ``videos`` and its dataset_info.json entry.

Rows match the official ``llamafactory/local_script/prepare_videokr_sft_data.py`` output for
the same VideoKR SFT rows, and the default name is the one the official training yaml reads.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from corpus.exporters import (
    Exporter,
    ExportOption,
    SplitData,
    training_target,
    user_prompt,
    write_json,
)
from vkr_core.files import atomic_path
from vkr_core.schemas import InputError

TAGS = {
    "role_tag": "role",
    "content_tag": "content",
    "user_tag": "user",
    "assistant_tag": "assistant",
}


class LlamaFactoryExporter(Exporter):
    name = "llamafactory"
    description = (
        "LLaMA-Factory sharegpt JSON (messages + videos) of the SFT set, with dataset_info.json"
    )
    options = {
        "dataset": ExportOption(
            "videokr_train",
            "dataset name in dataset_info.json and file stem (the official yaml's `dataset:`)",
        ),
    }

    def write(self, data: SplitData, out_dir: Path, options: dict[str, Any]) -> list[Path]:
        name = str(options["dataset"])
        if not name or "/" in name or os.sep in name:
            raise InputError(f"llamafactory dataset name {name!r} must be a plain file stem")
        data_path = out_dir / f"{name}.json"
        # One conversation per line inside the list: readable, diffable, still one JSON document.
        with atomic_path(data_path) as temporary, temporary.open("w", encoding="utf-8") as handle:
            handle.write("[")
            for index, example in enumerate(data.sft):
                row = {
                    "messages": [
                        {"role": "user", "content": user_prompt(example, "sft")},
                        {"role": "assistant", "content": training_target(example)},
                    ],
                    "videos": [example.video_path],
                }
                handle.write(("," if index else "") + "\n" + json.dumps(row, ensure_ascii=False))
            handle.write("\n]\n")

        info_path = out_dir / "dataset_info.json"
        info: dict[str, Any] = {}
        # Exporting straight into LLaMA-Factory's data/ folder adds our entry to its registry.
        if info_path.exists():
            try:
                info = json.loads(info_path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as exc:
                raise InputError(f"existing {info_path} is not valid JSON: {exc.msg}") from None
            if not isinstance(info, dict):
                raise InputError(f"existing {info_path} is not a JSON object")
        info[name] = {
            "file_name": data_path.name,
            "formatting": "sharegpt",
            "columns": {"messages": "messages", "videos": "videos"},
            "tags": dict(TAGS),
        }
        write_json(info_path, info)
        return [data_path, info_path]
