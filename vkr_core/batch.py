"""Many videos at once on one machine: bounded concurrency, a stop target, live counters.

Each video runs its own checkpointed graph, so a killed batch resumes video by video; a
video that fails is recorded and the batch goes on. Records and call records go to the run
directory as they are made; the batch keeps counters only, so its memory does not grow
with the number of videos.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path
from typing import Any

from corpus.report import FunnelCounts
from vkr_core.schemas import CallRecord, Video, VideoRecord


class ExitCode(IntEnum):
    """How `vkr run` and `vkr generate` end (documented in the README and `vkr run --help`)."""

    DONE = 0  # every video done
    ERROR = 1  # bad input, or an error that stopped the run (message on stderr)
    USAGE = 2  # a command-line option is wrong (click's own code)
    VIDEOS_FAILED = 3  # the run finished, some videos failed (failures.jsonl)
    BUDGET = 4  # --max-spend reached: work left; rerun with a higher budget to go on
    PREFLIGHT = 5  # a model the run needs has no key or does not answer: nothing started
    INTERRUPTED = 130  # Ctrl-C: finished work is saved; rerun to resume


@dataclass
class BatchCounters:
    """What the progress bar and the end of a run show, counted as videos and calls end."""

    total: int = 0
    done: int = 0
    failed: int = 0
    # Videos launched; those still without a record are in flight, or were cut short.
    launched: int = 0
    accepted: int = 0
    paid_calls: int = 0
    cached_calls: int = 0
    spend_usd: float = 0.0
    started: float = field(default_factory=time.monotonic)
    # Why the batch stopped before every video was processed ("budget"), if it did.
    stopped: str | None = None
    # Examples per stage and skill (the funnel), from the records of this invocation.
    funnel: FunnelCounts = field(default_factory=FunnelCounts)

    @property
    def unfinished(self) -> int:
        return self.launched - self.done - self.failed

    def on_call(self, record: CallRecord) -> None:
        if record.cache_hit:
            self.cached_calls += 1
        elif record.outcome != "error":
            self.paid_calls += 1
            self.spend_usd += record.cost_usd

    def on_video(self, record: VideoRecord) -> None:
        if record.status == "done":
            self.done += 1
        else:
            self.failed += 1
        self.accepted += len(record.accepted)
        self.funnel.add(record)

    def line(self) -> str:
        return (
            f"videos {self.done + self.failed}/{self.total} (failed {self.failed}) | "
            f"accepted {self.accepted} | calls paid {self.paid_calls}, cached {self.cached_calls} | "
            f"spend ${self.spend_usd:.4f}"
        )


class ProgressDisplay:
    """A rich progress bar on a terminal; a plain line every few videos elsewhere (CI, logs)."""

    def __init__(self, counters: BatchCounters, enabled: bool = True):
        self.counters = counters
        self.live = enabled and sys.stderr.isatty()
        self.enabled = enabled
        self._progress: Any = None
        self._task: Any = None
        self._every = 1

    def __enter__(self) -> ProgressDisplay:
        if self.live:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
            )

            self._progress = Progress(
                TextColumn("[bold]vkr run"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TextColumn("{task.fields[status]}"),
                transient=False,
            )
            self._progress.__enter__()
            self._task = self._progress.add_task("videos", total=self.counters.total, status="")
        self._every = max(1, self.counters.total // 20)
        return self

    def update(self) -> None:
        c = self.counters
        if self._progress is not None:
            self._progress.update(self._task, completed=c.done + c.failed, status=c.line())
        elif self.enabled and (
            (c.done + c.failed) % self._every == 0 or c.done + c.failed == c.total
        ):
            print(c.line(), file=sys.stderr, flush=True)

    def __exit__(self, *exc: Any) -> None:
        if self._progress is not None:
            self.update()
            self._progress.__exit__(*exc)


async def run_batch(
    process: Callable[[Video], Any],
    videos: Iterable[Video],
    counters: BatchCounters,
    concurrency: int = 4,
    target_accepted: int | None = None,
    on_video: Callable[[VideoRecord], None] | None = None,
    should_stop: Callable[[], bool] = lambda: False,
) -> BatchCounters:
    """Process videos with at most ``concurrency`` in flight; stop launching at the target.

    Each finished video's record goes to ``counters`` (and ``on_video``) and is dropped:
    it is on disk already. When a video raises (say, the disk is full) no new video starts,
    but the ones in flight are left to finish: cancelling them would drop replies already
    paid for. The first such error is raised once they have. Cancelling ``run_batch`` itself
    (a second Ctrl-C) cancels everything at once; ``counters`` keeps the videos finished by
    then.
    """
    slots = asyncio.Semaphore(concurrency)
    # Only the videos in flight: a finished task leaves the set, so 100,000 videos do not
    # leave 100,000 task objects behind.
    tasks: set[asyncio.Task[None]] = set()
    errors: list[BaseException] = []

    def stop_launching() -> bool:
        reached = target_accepted is not None and counters.accepted >= target_accepted
        return reached or bool(errors) or should_stop()

    async def one(video: Video) -> None:
        try:
            record = await process(video)
            counters.on_video(record)
            if on_video:
                on_video(record)
        except Exception as exc:
            errors.append(exc)
        finally:
            slots.release()

    try:
        for video in videos:
            await slots.acquire()
            if stop_launching():
                slots.release()
                break
            counters.launched += 1
            task = asyncio.create_task(one(video), name=f"video:{video.video_id}")
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        await asyncio.gather(*tasks)
    except BaseException:
        for task in list(tasks):
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
    if errors:
        raise errors[0]
    return counters


def spent_in(run_dir: str | Path) -> float:
    """USD the run directory's calls have cost so far (paid calls in ``calls.jsonl``)."""
    path = Path(run_dir) / "calls.jsonl"
    total = 0.0
    if not path.exists():
        return total
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            try:
                call = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a kill: its call is paid for again anyway
            if isinstance(call, dict) and not call.get("cache_hit"):
                total += float(call.get("cost_usd") or 0.0)
    return total
