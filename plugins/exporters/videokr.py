"""VideoKR release format: sft.jsonl (with trace) and rl.jsonl (verifiable answer only)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from corpus.exporters import Exporter, SplitData, rl_row, sft_row, write_jsonl


class VideoKRExporter(Exporter):
    name = "videokr"
    description = "VideoKR jsonl: sft.jsonl (question, answer, think) and rl.jsonl (no think)"

    def write(self, data: SplitData, out_dir: Path, options: dict[str, Any]) -> list[Path]:
        return [
            write_jsonl(out_dir / "sft.jsonl", (sft_row(e) for e in data.sft)),
            write_jsonl(out_dir / "rl.jsonl", (rl_row(e) for e in data.rl)),
        ]
