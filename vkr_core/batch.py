"""Many items at once on one machine: bounded concurrency, a stop target, live counters.

Each item (a video, for generation) runs its own checkpointed graph, so a killed batch
resumes item by item; an item that fails is recorded and the batch goes on. Records and
call records go to the run directory as they are made; the batch keeps counters only, so
its memory does not grow with the number of items.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

from vkr_core.pipelines import accepted_in
from vkr_core.schemas import CallRecord


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
    # Videos done before, by this run directory's drivers, and not processed again (a run
    # whose state is shared: RunConfig.state).
    skipped: int = 0
    accepted: int = 0
    paid_calls: int = 0
    cached_calls: int = 0
    spend_usd: float = 0.0
    started: float = field(default_factory=time.monotonic)
    # Why the batch stopped before every video was processed ("budget"), if it did.
    stopped: str | None = None
    # The pipeline's tally of this invocation's records (``add(record)``), e.g. the funnel.
    funnel: Any = None
    # How many accepted results a record holds (the pipeline says).
    accepted_in: Callable[[Any], int] = accepted_in

    @property
    def unfinished(self) -> int:
        return self.launched - self.done - self.failed

    def on_call(self, record: CallRecord) -> None:
        if record.cache_hit:
            self.cached_calls += 1
        elif record.outcome != "error":
            self.paid_calls += 1
            self.spend_usd += record.cost_usd

    def on_video(self, record: Any) -> None:
        if record is None:  # not this driver's: done before, or held by another driver
            self.launched -= 1
            return
        if record.status == "done":
            self.done += 1
        else:
            self.failed += 1
        self.accepted += self.accepted_in(record)
        if self.funnel is not None:
            self.funnel.add(record)

    def line(self) -> str:
        skipped = f", done before {self.skipped}" if self.skipped else ""
        return (
            f"videos {self.done + self.failed}/{self.total} (failed {self.failed}{skipped}) | "
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
    process: Callable[[Any], Awaitable[Any]],
    videos: Iterable[Any],
    counters: BatchCounters,
    concurrency: int = 4,
    target_accepted: int | None = None,
    on_video: Callable[[Any], None] | None = None,
    should_stop: Callable[[], bool] = lambda: False,
    prepare: Callable[[Any], Awaitable[None]] | None = None,
    lookahead: int | None = None,
) -> BatchCounters:
    """Process items with at most ``concurrency`` in flight; stop launching at the target.

    ``prepare`` (the pipeline's work ahead, such as decoding frames) runs for up to
    ``lookahead`` items (default: ``concurrency``) beyond those in flight, so an item's
    first model call never waits for its decoding: without it, a batch of videos that
    finished together left the model slots idle while the next ones decoded.

    Each finished video's record goes to ``counters`` (and ``on_video``) and is dropped:
    it is on disk already. When a video raises (say, the disk is full) no new video starts,
    but the ones in flight are left to finish: cancelling them would drop replies already
    paid for. The first such error is raised once they have. Cancelling ``run_batch`` itself
    (a second Ctrl-C) cancels everything at once; ``counters`` keeps the videos finished by
    then.
    """
    slots = asyncio.Semaphore(concurrency)
    ahead = asyncio.Semaphore(concurrency + (concurrency if lookahead is None else lookahead))
    # Only the items in flight: a finished task leaves the set, so 100,000 items do not
    # leave 100,000 task objects behind.
    tasks: set[asyncio.Task[None]] = set()
    errors: list[BaseException] = []

    def stop_launching() -> bool:
        reached = target_accepted is not None and counters.accepted >= target_accepted
        return reached or bool(errors) or should_stop()

    async def one(item: Any) -> None:
        try:
            if prepare is not None:
                await prepare(item)
            async with slots:
                if stop_launching():
                    return
                counters.launched += 1
                record = await process(item)
            counters.on_video(record)
            if on_video:
                on_video(record)
        except Exception as exc:
            errors.append(exc)
        finally:
            ahead.release()

    try:
        for item in videos:
            await ahead.acquire()
            if stop_launching():
                ahead.release()
                break
            task = asyncio.create_task(one(item), name="item")
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
