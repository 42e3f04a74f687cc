"""Split accepted examples into an SFT set (keeps the trace) and an RL set, grouped by video.

No video has examples on both sides. Videos are shuffled with the seed and taken into the
SFT set in that order for as long as that brings the SFT share of examples closer to the
requested one (the paper's 201,156 of 315,537 by default), so the share is off by at most
half of one video's examples and the same seed always gives the same split.
"""

from __future__ import annotations

import json
import os
import random
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from corpus.exporters import (
    OPEN_ENDED,
    check_example,
    checked_answer,
    load_accepted,
    rl_row,
    sft_row,
    write_json,
    write_jsonl,
)
from vkr_core.schemas import AcceptedExample, InputError, SplitManifest, SplitSide
from vkr_core.store import RunLayout, SplitLayout

PAPER_SFT_EXAMPLES = 201_156
PAPER_TOTAL_EXAMPLES = 315_537
PAPER_SFT_SHARE = PAPER_SFT_EXAMPLES / PAPER_TOTAL_EXAMPLES


@dataclass(frozen=True)
class Split:
    """A partition of examples by video."""

    sft: list[AcceptedExample]
    rl: list[AcceptedExample]
    sft_videos: list[str]
    rl_videos: list[str]
    seed: int
    sft_share_requested: float

    @property
    def sft_share(self) -> float:
        total = len(self.sft) + len(self.rl)
        return len(self.sft) / total if total else 0.0


def video_files(run_dirs: Sequence[str | Path]) -> dict[str, str]:
    """Video id -> the file its run read (the record's resolved ``video.path``)."""
    files: dict[str, str] = {}
    for run_dir in run_dirs:
        for path in RunLayout(run_dir).record_files():
            try:
                video = json.loads(path.read_text(encoding="utf-8"))["video"]
            except (OSError, ValueError, KeyError, TypeError):
                continue  # load_accepted reports an unreadable record
            if isinstance(video, dict) and isinstance(video.get("path"), str):
                files[path.stem] = os.path.normpath(video["path"])
    return files


def _video_groups(
    examples: Sequence[AcceptedExample], files: Mapping[str, str] | None = None
) -> dict[str, list[AcceptedExample]]:
    """Examples grouped by video; ids that share a video file are one group.

    A video is known by its file (``files``: video id -> the path its run read), else by its
    ``video_path``. The same file processed under two ids (two runs, two sources, two roots)
    must not land on both sides; two files that merely share a name, or a relative path
    under different roots, are two videos.
    """
    files = files or {}
    parent: dict[str, str] = {}

    def find(key: str) -> str:
        while parent.setdefault(key, key) != key:
            parent[key] = parent[parent[key]]
            key = parent[key]
        return key

    owner_of_file: dict[str, str] = {}
    for example in examples:
        find(example.video_id)
        known = files.get(example.video_id)
        identity = f"file:{known}" if known else f"video_path:{example.video_path}"
        other = owner_of_file.setdefault(identity, example.video_id)
        a, b = find(other), find(example.video_id)
        if a != b:
            parent[max(a, b)] = min(a, b)
    groups: dict[str, list[AcceptedExample]] = {}
    for example in examples:
        groups.setdefault(find(example.video_id), []).append(example)
    return groups


def split_examples(
    examples: Sequence[AcceptedExample],
    sft_share: float = PAPER_SFT_SHARE,
    seed: int = 0,
    files: Mapping[str, str] | None = None,
) -> Split:
    """Partition ``examples`` by video into SFT and RL with about ``sft_share`` of them in SFT.

    Every example is checked first (empty answer or trace, options): the error names the
    problem_id, whatever side the seed would have put it on. ``files`` (video id -> file,
    see :func:`video_files`) groups ids by the file they were made from.
    """
    if not 0.0 <= sft_share <= 1.0:
        raise InputError(f"sft share {sft_share} must be between 0 and 1")
    if not examples:
        raise InputError("there are no accepted examples to split")
    seen: set[str] = set()
    for example in examples:
        if example.problem_id in seen:
            raise InputError(f"problem_id {example.problem_id!r} appears twice")
        seen.add(example.problem_id)
        check_example(example)

    groups = _video_groups(examples, files)
    order = sorted(groups)
    random.Random(seed).shuffle(order)
    target = sft_share * len(examples)
    taken, best_count, best_gap = 0, 0, target
    for count, group in enumerate(order, start=1):
        taken += len(groups[group])
        gap = abs(taken - target)
        if gap < best_gap:
            best_count, best_gap = count, gap
        elif taken > target:
            break  # past the target every further video only widens the gap
    sft_keys = set(order[:best_count])

    def by_id(example: AcceptedExample) -> tuple[str, str]:
        return (example.video_id, example.problem_id)

    sft = sorted((e for k in sft_keys for e in groups[k]), key=by_id)
    rl = sorted((e for k in groups if k not in sft_keys for e in groups[k]), key=by_id)
    return Split(
        sft=sft,
        rl=rl,
        sft_videos=sorted({e.video_id for e in sft}),
        rl_videos=sorted({e.video_id for e in rl}),
        seed=seed,
        sft_share_requested=sft_share,
    )


def _side(examples: list[AcceptedExample], videos: list[str]) -> SplitSide:
    return SplitSide(
        examples=len(examples),
        videos=len(videos),
        by_skill=dict(sorted(Counter(e.skill for e in examples).items())),
        by_problem_type=dict(sorted(Counter(e.problem_type for e in examples).items())),
        video_ids=videos,
    )


def open_ended_below_full_reward(examples: Sequence[AcceptedExample]) -> list[str]:
    """Open-ended problem ids where even the exact answer earns accuracy below 1.

    ROUGE-2 needs a bigram: a one-word answer caps accuracy at 2/3, a symbol-only or
    non-Latin answer (no token ROUGE keeps) at 0.
    """
    from corpus.reward import rouge_tokens

    return [
        e.problem_id
        for e in examples
        if e.problem_type == OPEN_ENDED and len(rouge_tokens(checked_answer(e))) < 2
    ]


def write_split(
    split: Split,
    out_dir: str | Path,
    run_dirs: Sequence[str | Path] = (),
    excluded_unfinished: Sequence[str] = (),
) -> SplitManifest:
    """Write the SFT and RL files and the split's manifest into ``out_dir`` (SplitLayout)."""
    out = SplitLayout(out_dir)
    # Build every row before writing any file, so a refused example leaves nothing half-written.
    sft_rows = [sft_row(e) for e in split.sft]
    rl_rows = [rl_row(e) for e in split.rl]
    manifest = SplitManifest(
        seed=split.seed,
        sft_share_requested=split.sft_share_requested,
        sft_share=split.sft_share,
        run_dirs=[str(d) for d in run_dirs],
        sft=_side(split.sft, split.sft_videos),
        rl=_side(split.rl, split.rl_videos),
        open_ended_below_full_reward=open_ended_below_full_reward(split.rl),
        excluded_unfinished=list(excluded_unfinished),
    )
    out.root.mkdir(parents=True, exist_ok=True)
    write_jsonl(out.sft, sft_rows)
    write_jsonl(out.rl, rl_rows)
    write_json(out.manifest, manifest.model_dump(mode="json"))
    return manifest


def split_run_dirs(
    run_dirs: Sequence[str | Path],
    out_dir: str | Path,
    sft_share: float = PAPER_SFT_SHARE,
    seed: int = 0,
    exclude_unfinished: bool = False,
) -> SplitManifest:
    """Load the accepted examples of ``run_dirs``, split them by video, write the split.

    Unfinished videos are refused, or with ``exclude_unfinished`` left out and listed in
    the manifest's ``excluded_unfinished``.
    """
    excluded: list[str] = []
    examples = load_accepted(run_dirs, exclude_unfinished, excluded)
    if not examples:
        names = ", ".join(str(d) for d in run_dirs)
        raise InputError(f"no accepted examples in {names}: nothing to split")
    return write_split(
        split_examples(examples, sft_share, seed, video_files(run_dirs)),
        out_dir,
        run_dirs,
        excluded_unfinished=excluded,
    )
