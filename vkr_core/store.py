"""The run directory: config snapshot, checkpoints, call cache, frames, records, call log.

Layout (:class:`RunLayout` is the one place that names these files)::

    RUN_DIR/config.json          what the run was started with (a rerun must match)
    RUN_DIR/checkpoints.sqlite   LangGraph checkpoints, thread = video id
    RUN_DIR/cache/               the model-call cache (diskcache, never evicts)
    RUN_DIR/frames/<video_id>/   sampled frames, JPEG, encoded once
    RUN_DIR/records/<video_id>.json   one VideoRecord per finished video
    RUN_DIR/calls.jsonl          one CallRecord per call (cache hits included)
    RUN_DIR/preflight.jsonl      the reach check of each model before the run, one per model
    RUN_DIR/failures.jsonl       videos that could not be processed, with the reason
    RUN_DIR/inputs/<step>.jsonl  rendered step inputs, for qualification pilots
    RUN_DIR/run.lock             held by the process that has the run open
    RUN_DIR/report.{json,md,html,png}   what `vkr report` writes (unless --out)

A split folder (``vkr split --out``) holds ``sft.jsonl``, ``rl.jsonl`` and ``split.json``
(:class:`SplitLayout`).
"""

from __future__ import annotations

import bisect
import hashlib
import heapq
import json
import os
import shutil
import time
from array import array
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from vkr_core.files import JsonlProblem, atomic_write, read_jsonl
from vkr_core.log import get_logger, redact
from vkr_core.schemas import (  # noqa: F401  # DiskFull, is_disk_full: re-exported
    CallRecord,
    DiskFull,
    InputError,
    Video,
    VideoRecord,
    VkrError,
    check_video_id,
    is_disk_full,
)


class DigestSet:
    """A set of 64-bit digests at 8 bytes each (a set of Python ints costs ~70).

    A sorted array plus a small set of recent additions, merged into the array (streaming,
    no list of ints) once the recent set passes 1/16 of it: O(log n) lookups, amortised
    O(log n) additions.
    """

    def __init__(self) -> None:
        self._sorted = array("Q")
        self._recent: set[int] = set()

    def __contains__(self, digest: int) -> bool:
        if digest in self._recent:
            return True
        at = bisect.bisect_left(self._sorted, digest)
        return at < len(self._sorted) and self._sorted[at] == digest

    def add(self, digest: int) -> None:
        if digest in self:
            return
        self._recent.add(digest)
        if len(self._recent) > max(1024, len(self._sorted) // 16):
            self._sorted = array("Q", heapq.merge(self._sorted, sorted(self._recent)))
            self._recent.clear()

    def __len__(self) -> int:
        return len(self._sorted) + len(self._recent)


def _input_digest(key: str) -> int:
    """A 64-bit digest of an input key (a collision, about 1 in 30 million at a million
    inputs, would only leave one input out of the pilots' pool)."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big")


log = get_logger("vkr.store")

# What a recorded step input names of its item besides its id, for qualification pilots'
# strata: a video's come from the video, other items' from ``Step.strata``.
STRATA_FIELDS = ("discipline", "subject")


class RunLayout:
    """Where each file of a run directory is: the one place that spells their names.

    Paths only: nothing is created, read or locked, so a report, a split or an export can
    use it on a run directory another process has open.
    """

    def __init__(self, root: str | os.PathLike[str]):
        self.root = Path(root)

    @property
    def config(self) -> Path:
        """The config snapshot a rerun must match."""
        return self.root / "config.json"

    def read_config(self) -> dict[str, Any] | None:
        """The config snapshot, or None when the run has not written one yet.

        The one reader of ``config.json``: a damaged file is an InputError naming it, never a
        JSON traceback, whoever reads it (a report, an export, a probe).
        """
        path = self.config
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise InputError(f"cannot read {path}: {exc.strerror or exc}") from None
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise InputError(f"{path} is damaged (not JSON: {exc})") from None
        if not isinstance(data, dict):
            raise InputError(f"{path} is damaged (not a JSON object)")
        return data

    @property
    def checkpoints(self) -> Path:
        """The SQLite checkpoint database (thread = video id)."""
        return self.root / "checkpoints.sqlite"

    @property
    def cache(self) -> Path:
        """The model-call cache folder."""
        return self.root / "cache"

    @property
    def frames_root(self) -> Path:
        """The folder of every video's sampled frames."""
        return self.root / "frames"

    def frames(self, video_id: str) -> Path:
        """The folder of one video's sampled frames."""
        return self.frames_root / check_video_id(video_id)

    @property
    def records(self) -> Path:
        """The folder of per-video records."""
        return self.root / "records"

    def record(self, video_id: str) -> Path:
        """One video's record."""
        return self.records / f"{check_video_id(video_id)}.json"

    def record_files(self) -> list[Path]:
        """The record files, sorted by video id (an atomic write's hidden temporary left out)."""
        if not self.records.is_dir():
            return []
        return sorted(
            self.records / entry.name
            for entry in os.scandir(self.records)
            if entry.name.endswith(".json") and not entry.name.startswith(".")
        )

    @property
    def calls(self) -> Path:
        """One CallRecord per model call, in the order they were made."""
        return self.root / "calls.jsonl"

    @property
    def failures(self) -> Path:
        """Videos that could not be processed, with the reason."""
        return self.root / "failures.jsonl"

    @property
    def preflight(self) -> Path:
        """The reach check of each model, kept apart from the steps' calls."""
        return self.root / "preflight.jsonl"

    @property
    def inputs_root(self) -> Path:
        """The folder of rendered step inputs (for qualification pilots)."""
        return self.root / "inputs"

    def inputs(self, step: str) -> Path:
        """The rendered inputs of one step."""
        return self.inputs_root / f"{step}.jsonl"

    @property
    def lock(self) -> Path:
        """The file the process that has the run open holds a lock on."""
        return self.root / "run.lock"

    def provider_files(self, provider: str) -> Path:
        """The folder a provider plugin keeps its files of the run in (a server's log)."""
        return self.root / "providers" / provider

    def report(self, kind: str) -> Path:
        """The report file of a kind (``json``, ``md``, ``html``, ``png``)."""
        return self.root / f"report.{kind}"

    def looks_like_run(self) -> bool:
        """Whether the folder holds what a run writes (records, calls or failures)."""
        return any(p.exists() for p in (self.records, self.calls, self.failures))


class SplitLayout:
    """The files of a split folder, as `vkr split` writes them and exporters read them."""

    def __init__(self, root: str | os.PathLike[str]):
        self.root = Path(root)

    @property
    def sft(self) -> Path:
        return self.root / "sft.jsonl"

    @property
    def rl(self) -> Path:
        return self.root / "rl.jsonl"

    @property
    def manifest(self) -> Path:
        """What `vkr split` decided (SplitManifest)."""
        return self.root / "split.json"

    def side(self, name: str) -> Path:
        """``sft`` or ``rl``."""
        return {"sft": self.sft, "rl": self.rl}[name]


def log_problem(problem: JsonlProblem) -> None:
    """The default for a damaged line of a run's log: skip it, with a warning."""
    log.warning("skipped a damaged line", where=str(problem))


def spent_in(
    run_dir: str | os.PathLike[str], on_problem: Callable[[JsonlProblem], None] | None = None
) -> float:
    """USD the run directory's calls have cost so far (paid calls in its call log).

    A damaged line (a kill cuts the last one short) goes to ``on_problem``, by default a
    warning: its call, if it was paid, is not counted.
    """
    total = 0.0
    for _, call in read_jsonl(
        RunLayout(run_dir).calls, CallRecord, on_problem=on_problem or log_problem, missing_ok=True
    ):
        if not call.cache_hit:
            total += call.cost_usd or 0.0
    return total


def _diff(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new)):
            out += _diff(old.get(key), new.get(key), f"{prefix}{key}.")
        return out
    return [] if old == new else [f"{prefix.rstrip('.')}: {old!r} -> {new!r}"]


def _ends_mid_line(path: Path) -> bool:
    try:
        with path.open("rb") as handle:
            if handle.seek(0, os.SEEK_END) == 0:
                return False
            handle.seek(-1, os.SEEK_END)
            return handle.read(1) != b"\n"
    except FileNotFoundError:
        return False


class RunDirectoryInUse(InputError):
    """Another process holds the run directory: two runs on one directory pay twice."""


class RunLock:
    """An exclusive lock on a run directory, held for as long as a run is open.

    An advisory ``flock`` on ``RUN_DIR/run.lock``: the kernel drops it when the holder
    exits, however it dies (kill -9 included), so a stale lock never blocks a rerun. The
    file says who holds it, for the refusal message.
    """

    def __init__(self, root: Path):
        self.path = RunLayout(root).lock
        self._fd: int | None = None

    def acquire(self, command: str = "vkr", shared: bool = False) -> None:
        """Take the lock; ``shared`` for drivers that share their state (RunConfig.state),
        which keep off each other's items by claims: they exclude only an unshared run."""
        import fcntl

        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip()
            os.close(fd)
            try:
                info = json.loads(holder)
                who = f"PID {info['pid']} ({info.get('command', 'vkr')}, started {info.get('started', '?')})"
            except (ValueError, KeyError, TypeError):
                who = "another process"
            raise RunDirectoryInUse(
                f"run directory {self.path.parent} is in use by {who}: two runs on one "
                "directory would pay for the same calls twice; wait for it to finish or stop "
                "it, or use another --out"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        info = {
            "pid": os.getpid(),
            "command": command,
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            # Closing the descriptor drops the flock; the file stays (unlinking it would
            # race with a process that opened it and is about to lock).
            os.close(self._fd)
            self._fd = None


class _DriversLock(RunLock):
    """The lock of a run a worker process joins: its driver holds it, the worker takes none."""

    def acquire(self, command: str = "vkr", shared: bool = False) -> None:
        pass


class RunStore:
    def __init__(self, run_dir: str | Path, joined: bool = False):
        """``joined``: a worker process of a run its driver has open (a distributed
        executor): no lock of its own, and the config snapshot is only compared."""
        self.root = Path(run_dir)
        self.joined = joined
        self.layout = RunLayout(self.root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.layout.records.mkdir(exist_ok=True)
        # 64-bit digests of the input keys seen per step: a run sees ~30 inputs per video.
        self._seen_inputs: dict[str, DigestSet] = {}
        # Logs whose end has been checked since this store opened (see _append).
        self._tails_checked: set[Path] = set()
        self.run_lock = _DriversLock(self.root) if joined else RunLock(self.root)

    def disk_full_error(self, exc: BaseException | None = None) -> DiskFull:
        if isinstance(exc, DiskFull) and str(exc).startswith("the disk holding"):
            return exc  # already says where and what to do
        return DiskFull(
            f"the disk holding {self.root} is full"
            + (f" ({type(exc).__name__}: {exc})" if exc else "")
            + ": nothing finished is lost; free some space and run the same command again to resume"
        )

    def low_on_space(self, minimum: int = 1 << 20) -> bool:
        return shutil.disk_usage(self.root).free < minimum

    @property
    def checkpoint_path(self) -> Path:
        return self.layout.checkpoints

    @property
    def cache_dir(self) -> Path:
        return self.layout.cache

    def frames_dir(self, video_id: str) -> Path:
        return self.layout.frames(video_id)

    def record_path(self, video_id: str) -> Path:
        return self.layout.record(video_id)

    def check_config(self, snapshot: dict[str, Any], force: bool = False) -> None:
        """Refuse to mix results of different configs in one run directory unless forced."""
        path = self.layout.config
        if self.joined:
            self._check_joined(snapshot)
            return
        try:
            old = None if force else self.layout.read_config()
        except InputError as exc:
            raise InputError(f"{exc}: use another --out, or --force to start it afresh") from None
        if old is not None:
            differences = _diff(old, snapshot)
            if differences:
                raise InputError(
                    f"run directory {self.root} was made with a different config ("
                    + "; ".join(differences[:5])
                    + (" ..." if len(differences) > 5 else "")
                    + "): use another --out, or --force to continue with the new config"
                )
        atomic_write(path, json.dumps(snapshot, indent=2, sort_keys=True))

    def _check_joined(self, snapshot: dict[str, Any]) -> None:
        # A worker on another machine may have other plugin versions (prompts, schemas):
        # its replies would not be the run's, so it stops before any call.
        old = self.layout.read_config()
        if old is None:
            raise InputError(
                f"{self.layout.config} is missing: a worker joins a run its driver has opened"
            )
        differences = _diff(old, snapshot)
        if differences:
            raise InputError(
                f"this worker's config or plugins differ from the run in {self.root} ("
                + "; ".join(differences[:5])
                + (" ..." if len(differences) > 5 else "")
                + "): install the driver's vkr and plugins on every node"
            )

    def write_record(self, record: BaseModel, item_id: str | None = None) -> Path:
        """An item's record (a VideoRecord, or another pipeline's record, named by its
        ``video_id`` or ``item_id`` unless ``item_id`` is given), replaced atomically."""
        key = item_id or getattr(record, "video_id", None) or getattr(record, "item_id", None)
        if not key:
            raise ValueError(f"{type(record).__name__} has no video_id or item_id: name it")
        path = self.record_path(str(key))
        atomic_write(path, redact(record.model_dump_json(indent=2)))
        return path

    def read_record(self, video_id: str) -> VideoRecord | None:
        path = self.record_path(video_id)
        if not path.exists():
            return None
        return VideoRecord.model_validate_json(path.read_text())

    def iter_records(self) -> Iterator[VideoRecord]:
        """The records in video-id order, one at a time (a big run's do not fit in memory)."""
        for path in self.layout.record_files():
            yield VideoRecord.model_validate_json(path.read_text())

    def records(self) -> list[VideoRecord]:
        """Every record at once: for a few videos; ``iter_records`` for a run."""
        return list(self.iter_records())

    def _append(self, path: Path, data: dict[str, Any] | str) -> None:
        """One line at the end of a log: ``data`` as JSON, or a JSON object already encoded."""
        encoded_data = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
        line = redact(encoded_data) + "\n"
        if path not in self._tails_checked:
            path.parent.mkdir(parents=True, exist_ok=True)
            # A run killed mid-line left the last line cut short: end it first, or this
            # line would be glued to it and lost with it (a paid call unaccounted for).
            if _ends_mid_line(path):
                line = "\n" + line
            self._tails_checked.add(path)
        # One write(2) of the whole line on an O_APPEND descriptor: drivers sharing the run
        # directory append to the same logs, and a buffered file may split a long line
        # into several writes that another process's line lands between.
        encoded = line.encode("utf-8")
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            written = os.write(fd, encoded)
            while written < len(encoded):  # only on a full disk or a signal: finish the line
                written += os.write(fd, encoded[written:])
        finally:
            os.close(fd)

    def append_call(self, record: CallRecord) -> None:
        # pydantic's own encoder: a quarter of the CPU of model_dump + json.dumps, and one
        # line is appended per call.
        self._append(self.layout.calls, record.model_dump_json())

    def append_preflight(self, record: CallRecord) -> None:
        """A model's reach check, beside the call log (it is not a step's call)."""
        self._append(self.layout.preflight, record.model_dump_json())

    def iter_calls(
        self, on_problem: Callable[[JsonlProblem], None] | None = None
    ) -> Iterator[CallRecord]:
        """The call records in the order they were made, one line at a time; a damaged line
        goes to ``on_problem`` (by default a warning) and is skipped."""
        for _, call in read_jsonl(
            self.layout.calls, CallRecord, on_problem=on_problem or log_problem, missing_ok=True
        ):
            yield call

    def calls(self) -> list[CallRecord]:
        """Every call record at once: for a few videos; ``iter_calls`` for a run."""
        return list(self.iter_calls())

    def add_failure(self, video_id: str, reason: str, path: str | None = None) -> None:
        self._append(
            self.layout.failures,
            {"video_id": video_id, "path": path, "reason": redact(reason), "time": time.time()},
        )

    def record_input(
        self,
        step: str,
        key: str,
        video: Video,
        messages: list[dict[str, Any]],
        meta: dict[str, Any],
        prompt_version: str | None = None,
    ) -> None:
        """Keep each distinct rendered input of a step once, for qualification pilots."""
        where = {
            "video_id": video.video_id,
            "discipline": video.discipline,
            "subject": video.subject,
        }
        self._record_step_input(step, key, where, messages, meta, prompt_version)

    def record_item_input(
        self,
        step: str,
        key: str,
        item_id: str,
        messages: list[dict[str, Any]],
        meta: dict[str, Any],
        prompt_version: str | None = None,
        strata: Mapping[str, str] | None = None,
    ) -> None:
        """``record_input`` for an item that is not a video (a text step's input).

        ``strata`` (``discipline``, ``subject``: see ``Step.strata``) are recorded where a
        video's are, so pilots of the step sample every discipline, not one "unknown".
        """
        where: dict[str, Any] = {"item_id": item_id}
        for name, value in (strata or {}).items():
            if name not in STRATA_FIELDS:
                raise ValueError(
                    f"step {step!r}: unknown stratum {name!r}; strata are {', '.join(STRATA_FIELDS)}"
                )
            if value:
                where[name] = str(value)
        self._record_step_input(step, key, where, messages, meta, prompt_version)

    def _record_step_input(
        self,
        step: str,
        key: str,
        where: dict[str, Any],
        messages: list[dict[str, Any]],
        meta: dict[str, Any],
        prompt_version: str | None,
    ) -> None:
        # Imported here: reading a run directory (reports, exports) needs no model-call code.
        from vkr_core.calls import key_messages

        seen = self._seen_inputs.get(step)
        if seen is None:
            path = self.layout.inputs(step)
            seen = DigestSet()
            for _, line in read_jsonl(path, on_problem=log_problem, missing_ok=True):
                if isinstance(line.get("key"), str):
                    seen.add(_input_digest(line["key"]))
            self._seen_inputs[step] = seen
        digest = _input_digest(key)
        if digest in seen:
            return
        seen.add(digest)
        frames = [
            {"sha256": p["sha256"], "path": p["path"]}
            for m in messages
            if isinstance(m["content"], list)
            for p in m["content"]
            if p.get("type") == "frame"
        ]
        self._append(
            self.layout.inputs(step),
            {
                "key": key,
                "step": step,
                "prompt_version": prompt_version,
                **where,
                "meta": meta,
                "frames": frames,
                "messages": key_messages(messages),
            },
        )
