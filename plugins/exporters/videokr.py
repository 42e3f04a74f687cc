"""VideoKR release format: sft.jsonl (with trace) and rl.jsonl (verifiable answer only)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from corpus.exporters import Exporter, SplitData, rl_row, sft_row, write_jsonl
from vkr_core.store import SplitLayout


class VideoKRExporter(Exporter):
    name = "videokr"
    description = "VideoKR jsonl: sft.jsonl (question, answer, think) and rl.jsonl (no think)"

    def write(self, data: SplitData, out_dir: Path, options: dict[str, Any]) -> list[Path]:
        # The files of a split folder: an export can be split or exported again.
        files = SplitLayout(out_dir)
        return [
            write_jsonl(files.sft, (sft_row(e) for e in data.sft)),
            write_jsonl(files.rl, (rl_row(e) for e in data.rl)),
        ]
